//! sqlx repositories for users and refresh tokens, in SQL that PostgreSQL and
//! SQLite share.

use flashmesh_platform::{db, identity::Role, telemetry};
use sqlx::{AnyPool, FromRow};

use crate::domain::{StoredRefreshToken, User, parse_role, role_name};

#[derive(FromRow)]
struct UserRow {
    id: String,
    email: String,
    display_name: String,
    role: String,
    password_hash: String,
    created_at: i64,
}

impl TryFrom<UserRow> for User {
    type Error = sqlx::Error;

    fn try_from(row: UserRow) -> Result<Self, Self::Error> {
        let role = parse_role(&row.role)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown role {:?}", row.role).into()))?;
        Ok(Self {
            id: row.id,
            email: row.email,
            display_name: row.display_name,
            role,
            password_hash: row.password_hash,
            created_at: row.created_at,
        })
    }
}

const USER_COLUMNS: &str = "id, email, display_name, role, password_hash, created_at";

#[derive(Clone)]
pub struct UserStore {
    pool: AnyPool,
}

impl UserStore {
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Inserts `user`; `false` when the email is taken (also under a race).
    pub async fn insert(&self, user: &User) -> Result<bool, sqlx::Error> {
        telemetry::db("auth.users.insert", async {
            let inserted = sqlx::query(
                "INSERT INTO users (id, email, display_name, role, password_hash, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (email) DO NOTHING",
            )
            .bind(&user.id)
            .bind(&user.email)
            .bind(&user.display_name)
            .bind(role_name(user.role))
            .bind(&user.password_hash)
            .bind(user.created_at)
            .execute(&self.pool)
            .await?;
            Ok(inserted.rows_affected() == 1)
        })
        .await
    }

    pub async fn find_by_email(&self, email: &str) -> Result<Option<User>, sqlx::Error> {
        telemetry::db("auth.users.find_by_email", async {
            self.find_one("email", email).await
        })
        .await
    }

    pub async fn find_by_id(&self, id: &str) -> Result<Option<User>, sqlx::Error> {
        telemetry::db("auth.users.find_by_id", async {
            self.find_one("id", id).await
        })
        .await
    }

    async fn find_one(
        &self,
        column: &'static str,
        value: &str,
    ) -> Result<Option<User>, sqlx::Error> {
        sqlx::query_as::<_, UserRow>(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE {column} = $1"
        ))
        .bind(value)
        .fetch_optional(&self.pool)
        .await?
        .map(User::try_from)
        .transpose()
    }

    pub async fn set_role(&self, id: &str, role: Role, now: i64) -> Result<(), sqlx::Error> {
        telemetry::db("auth.users.set_role", async {
            sqlx::query("UPDATE users SET role = $1, updated_at = $2 WHERE id = $3")
                .bind(role_name(role))
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }
}

/// A refresh token about to be stored.
pub struct NewRefreshToken {
    pub id: String,
    pub family_id: String,
    pub user_id: String,
    pub token_hash: String,
    pub issued_at: i64,
    pub expires_at: i64,
}

#[derive(FromRow)]
struct RefreshTokenRow {
    id: String,
    family_id: String,
    user_id: String,
    expires_at: i64,
    spent_at: Option<i64>,
    revoked_at: Option<i64>,
}

#[derive(Clone)]
pub struct RefreshTokenStore {
    pool: AnyPool,
}

const INSERT_REFRESH_TOKEN: &str = "INSERT INTO refresh_tokens \
     (id, family_id, user_id, token_hash, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)";

fn insert_refresh_token(
    token: &NewRefreshToken,
) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
    sqlx::query(INSERT_REFRESH_TOKEN)
        .bind(token.id.as_str())
        .bind(token.family_id.as_str())
        .bind(token.user_id.as_str())
        .bind(token.token_hash.as_str())
        .bind(token.issued_at)
        .bind(token.expires_at)
}

impl RefreshTokenStore {
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    pub async fn insert(&self, token: &NewRefreshToken) -> Result<(), sqlx::Error> {
        telemetry::db("auth.refresh_tokens.insert", async {
            insert_refresh_token(token).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    pub async fn find_by_hash(
        &self,
        hash: &str,
    ) -> Result<Option<StoredRefreshToken>, sqlx::Error> {
        telemetry::db("auth.refresh_tokens.find_by_hash", async {
            let row = sqlx::query_as::<_, RefreshTokenRow>(
                "SELECT id, family_id, user_id, expires_at, spent_at, revoked_at \
                 FROM refresh_tokens WHERE token_hash = $1",
            )
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map(|row| StoredRefreshToken {
                id: row.id,
                family_id: row.family_id,
                user_id: row.user_id,
                expires_at: row.expires_at,
                spent_at: row.spent_at,
                revoked_at: row.revoked_at,
            }))
        })
        .await
    }

    /// Spends `spent_id` and stores its successor in one transaction. `false`
    /// when the token was spent or revoked concurrently: exactly one of two
    /// racing exchanges wins, and the loser is treated as reuse.
    pub async fn rotate(
        &self,
        spent_id: &str,
        now: i64,
        successor: &NewRefreshToken,
    ) -> Result<bool, sqlx::Error> {
        telemetry::db("auth.refresh_tokens.rotate", async {
            let mut tx = db::begin(&self.pool).await?;
            let spent = sqlx::query(
                "UPDATE refresh_tokens SET spent_at = $1 \
                 WHERE id = $2 AND spent_at IS NULL AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(spent_id)
            .execute(&mut *tx)
            .await?;
            if spent.rows_affected() != 1 {
                db::rollback(tx).await?;
                return Ok(false);
            }
            insert_refresh_token(successor).execute(&mut *tx).await?;
            db::commit(tx).await?;
            Ok(true)
        })
        .await
    }

    /// Revokes every token of a family; idempotent.
    pub async fn revoke_family(&self, family_id: &str, now: i64) -> Result<(), sqlx::Error> {
        telemetry::db("auth.refresh_tokens.revoke_family", async {
            sqlx::query(
                "UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(family_id)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }
}
