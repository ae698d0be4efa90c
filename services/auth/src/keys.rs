//! Token signing keys: Ed25519, loaded from PEM files in production or
//! generated once under the data directory in the embedded default. The JWKS
//! publishes the current key and the one before the last rotation, so tokens
//! signed just before a rotation stay valid until they expire.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use async_trait::async_trait;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::{
    SigningKey, VerifyingKey,
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, spki::der::pem::LineEnding},
};
use flashmesh_platform::identity::{AccessClaims, BoxError, KeySource, TOKEN_ALGORITHM};
use flashmesh_proto::auth::v1::Jwk;
use jsonwebtoken::{EncodingKey, Header};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::KeyLocation;

const CURRENT_FILE: &str = "current.pem";
const PREVIOUS_FILE: &str = "previous.pem";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read signing key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write signing key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an Ed25519 PEM key (PKCS#8 private or SPKI public)")]
    Parse { path: PathBuf },
    #[error("cannot encode a generated key: {0}")]
    Encode(String),
}

/// An Ed25519 public key as the JWKS names it.
#[derive(Clone)]
struct PublicKey {
    kid: String,
    x: String,
}

impl PublicKey {
    fn of(key: &VerifyingKey) -> Self {
        let x = URL_SAFE_NO_PAD.encode(key.as_bytes());
        // RFC 7638 thumbprint: SHA-256 of the required members in order.
        let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        Self { kid, x }
    }

    fn jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: self.x.clone(),
            kid: self.kid.clone(),
            alg: "EdDSA".into(),
            r#use: "sig".into(),
        }
    }
}

pub struct SigningKeys {
    current: PublicKey,
    encoding: EncodingKey,
    previous: Option<PublicKey>,
}

impl SigningKeys {
    pub fn load(location: &KeyLocation) -> Result<Self, KeyError> {
        match location {
            KeyLocation::Files { current, previous } => {
                Self::from_files(current, previous.as_deref())
            }
            KeyLocation::Generated { dir } => {
                let current = dir.join(CURRENT_FILE);
                if !current.exists() {
                    write_new_key(&current)?;
                    tracing::info!(path = %current.display(), "generated a token signing key");
                }
                let previous = dir.join(PREVIOUS_FILE);
                Self::from_files(&current, previous.exists().then_some(previous.as_path()))
            }
        }
    }

    fn from_files(current: &Path, previous: Option<&Path>) -> Result<Self, KeyError> {
        let signing = SigningKey::from_pkcs8_pem(&read(current)?).map_err(|_| KeyError::Parse {
            path: current.into(),
        })?;
        let der = signing
            .to_pkcs8_der()
            .map_err(|e| KeyError::Encode(e.to_string()))?;
        let previous = previous
            .map(|path| {
                let pem = read(path)?;
                SigningKey::from_pkcs8_pem(&pem)
                    .map(|key| key.verifying_key())
                    .or_else(|_| VerifyingKey::from_public_key_pem(&pem))
                    .map(|key| PublicKey::of(&key))
                    .map_err(|_| KeyError::Parse { path: path.into() })
            })
            .transpose()?;
        Ok(Self {
            current: PublicKey::of(&signing.verifying_key()),
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            previous,
        })
    }

    /// The current key's id.
    pub fn kid(&self) -> &str {
        &self.current.kid
    }

    /// The public keys that verify tokens, current first.
    pub fn jwks(&self) -> Vec<Jwk> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .map(PublicKey::jwk)
            .collect()
    }

    pub fn sign(&self, claims: &AccessClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(TOKEN_ALGORITHM);
        header.kid = Some(self.current.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }
}

#[async_trait]
impl KeySource for SigningKeys {
    async fn public_keys(&self) -> Result<Vec<Jwk>, BoxError> {
        Ok(self.jwks())
    }
}

/// Rotates the generated keys in `dir`: the current key becomes the previous
/// one and a new current key is generated. Returns the new key id. Running
/// services pick it up on restart.
pub fn rotate(dir: &Path) -> Result<String, KeyError> {
    let current = dir.join(CURRENT_FILE);
    let previous = dir.join(PREVIOUS_FILE);
    if current.exists() {
        fs::rename(&current, &previous).map_err(|source| KeyError::Write {
            path: previous.clone(),
            source,
        })?;
    }
    write_new_key(&current)?;
    Ok(
        SigningKeys::from_files(&current, previous.exists().then_some(previous.as_path()))?
            .kid()
            .to_owned(),
    )
}

fn write_new_key(path: &Path) -> Result<(), KeyError> {
    let write_err = |source| KeyError::Write {
        path: path.into(),
        source,
    };
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let pem = SigningKey::from_bytes(&seed)
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(write_err)?;
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(write_err)?;
    file.write_all(pem.as_bytes()).map_err(write_err)
}

fn read(path: &Path) -> Result<String, KeyError> {
    fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_persist_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let location = KeyLocation::Generated {
            dir: dir.path().to_owned(),
        };
        let first = SigningKeys::load(&location).unwrap();
        assert_eq!(first.jwks().len(), 1);
        let again = SigningKeys::load(&location).unwrap();
        assert_eq!(first.kid(), again.kid(), "the key is generated once");

        let new_kid = rotate(dir.path()).unwrap();
        let rotated = SigningKeys::load(&location).unwrap();
        assert_eq!(rotated.kid(), new_kid);
        let kids: Vec<_> = rotated.jwks().into_iter().map(|k| k.kid).collect();
        assert_eq!(kids, [new_kid.clone(), first.kid().to_owned()]);
    }

    #[test]
    fn garbage_key_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        fs::write(&path, "not a key").unwrap();
        let err = SigningKeys::load(&KeyLocation::Files {
            current: path.clone(),
            previous: None,
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("key.pem"), "{err}");
    }
}
