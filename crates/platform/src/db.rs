//! Storage: one sqlx pool per service, PostgreSQL in production and a SQLite
//! file as the embedded default.
//!
//! Migrations and repositories write portable SQL against [`sqlx::AnyPool`] (`$n`
//! placeholders, `ON CONFLICT`, `RETURNING`), so one implementation serves
//! both backends and both pass the same tests. Each service owns a schema: on
//! PostgreSQL a schema of its own named after the service (set as the
//! connection's `search_path`), on SQLite a file of its own.
//!
//! Transactions go through [`begin`], [`commit`] and [`rollback`], which
//! callers giving up cannot interrupt halfway; clippy.toml forbids sqlx's
//! own.

use std::{path::Path, time::Duration};

use opentelemetry::context::FutureExt;
use sqlx::{
    Any, AnyPool, Executor, Transaction,
    any::{AnyPoolOptions, install_default_drivers},
    migrate::{MigrateError, Migrator},
};

use crate::{config::PlatformConfig, metrics::Metrics};

/// Which database a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the {schema} database: {source}")]
    Connect {
        schema: &'static str,
        source: sqlx::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("migrations failed: {0}")]
    Migrate(#[from] MigrateError),
}

/// A service's connection pool.
#[derive(Clone, Debug)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
}

impl Database {
    /// Opens the store for `schema` (a service name: lower-case ASCII letters
    /// and underscores) as the configuration says.
    pub async fn connect(
        config: &PlatformConfig,
        schema: &'static str,
    ) -> Result<Self, StoreError> {
        assert!(
            !schema.is_empty() && schema.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "schema names are fixed identifiers"
        );
        install_default_drivers();
        let connect_err = |source| StoreError::Connect { schema, source };
        let options = AnyPoolOptions::new()
            .max_connections(config.database_max_connections)
            .acquire_timeout(Duration::from_secs(5));

        match &config.database_url {
            Some(url) => {
                let setup = AnyPoolOptions::new()
                    .max_connections(1)
                    .connect(url)
                    .await
                    .map_err(connect_err)?;
                create_schema(&setup, schema).await.map_err(connect_err)?;
                setup.close().await;
                let search_path = format!("SET search_path TO {schema}");
                let pool = options
                    .after_connect(move |conn, _| {
                        let search_path = search_path.clone();
                        Box::pin(async move { conn.execute(search_path.as_str()).await.map(drop) })
                    })
                    .connect(url)
                    .await
                    .map_err(connect_err)?;
                Ok(Self {
                    pool,
                    backend: Backend::Postgres,
                })
            }
            None => {
                let dir = &config.data_dir;
                std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                    path: dir.display().to_string(),
                    source,
                })?;
                let pool = options
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL lets readers run beside the writer; the busy
                            // timeout makes writers queue instead of failing.
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                                 PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                            )
                            .await
                            .map(drop)
                        })
                    })
                    .connect(&sqlite_url(&dir.join(format!("{schema}.db"))))
                    .await
                    .map_err(connect_err)?;
                Ok(Self {
                    pool,
                    backend: Backend::Sqlite,
                })
            }
        }
    }

    /// Applies the migrations that have not run yet. Migrations are written
    /// in the SQL both backends share.
    pub async fn migrate(&self, migrator: &Migrator) -> Result<(), StoreError> {
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// Applies `migrator` to `schema` and closes the pool, without starting
    /// the service (or needing its keys): `flashmesh migrate`.
    pub async fn migrate_only(
        config: &PlatformConfig,
        schema: &'static str,
        migrator: &Migrator,
    ) -> Result<(), StoreError> {
        let db = Self::connect(config, schema).await?;
        let migrated = db.migrate(migrator).await;
        db.close().await;
        migrated
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Reports the pool's connections (in use, idle, maximum) as
    /// `flashmesh_db_pool_connections{schema, state}` at every scrape.
    pub fn observe(&self, metrics: &Metrics, schema: &'static str) {
        let family = metrics.gauge_family::<2>(
            "flashmesh_db_pool_connections",
            "Database pool connections by state (in_use, idle, max)",
        );
        let gauge = |state: &str| {
            family
                .get_or_create(&[("schema", schema.to_owned()), ("state", state.to_owned())])
                .clone()
        };
        let (in_use, idle, max) = (gauge("in_use"), gauge("idle"), gauge("max"));
        let pool = self.pool.clone();
        metrics.on_scrape(move || {
            let size = i64::from(pool.size());
            let idle_now = i64::try_from(pool.num_idle()).unwrap_or(i64::MAX);
            in_use.set(size - idle_now.min(size));
            idle.set(idle_now);
            max.set(i64::from(pool.options().get_max_connections()));
        });
    }
}

/// Begins a transaction on `pool`, such that a caller who stops waiting (a
/// deadline, a client hanging up: its future is dropped) never leaves the
/// connection inside a transaction.
///
/// `Pool::begin` cannot promise that on PostgreSQL (sqlx 0.8.6 and 0.9.0,
/// sqlx issue #4393): the driver counts the transaction only once `BEGIN`
/// is answered, and the rollback a dropped transaction queues keys on that
/// count. A future dropped while `BEGIN` is in flight therefore returns its
/// connection to the pool inside a transaction that nothing ends; the next
/// borrowers' writes run in it, unseen by other connections and lost if it
/// rolls back, and their `BEGIN` draws PostgreSQL's warning "there is
/// already a transaction in progress". So `BEGIN` runs to completion in a
/// task of its own; when the caller is gone by then, the task drops the
/// counted transaction, which rolls it back before the connection is reused.
#[allow(clippy::disallowed_methods)] // the sanctioned caller
pub async fn begin(pool: &AnyPool) -> Result<Transaction<'static, Any>, sqlx::Error> {
    let pool = pool.clone();
    to_completion(async move { pool.begin().await }).await
}

/// Commits `tx`, to completion even if the caller stops waiting: the
/// outcome is the server's answer to `COMMIT`, never a `ROLLBACK` queued
/// behind a `COMMIT` already sent (which PostgreSQL answers with "there is
/// no transaction in progress").
#[allow(clippy::disallowed_methods)] // the sanctioned caller
pub async fn commit(tx: Transaction<'static, Any>) -> Result<(), sqlx::Error> {
    to_completion(tx.commit()).await
}

/// Rolls `tx` back, to completion even if the caller stops waiting (see
/// [`commit`]).
#[allow(clippy::disallowed_methods)] // the sanctioned caller
pub async fn rollback(tx: Transaction<'static, Any>) -> Result<(), sqlx::Error> {
    to_completion(tx.rollback()).await
}

/// Runs `work` in a task of its own, which finishes it whether or not the
/// caller still waits; in the caller's trace context, so what it logs is
/// the caller's.
async fn to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, sqlx::Error>> + Send + 'static,
) -> Result<T, sqlx::Error> {
    match tokio::spawn(work.with_current_context()).await {
        Ok(done) => done,
        Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
        // The runtime is shutting down.
        Err(cancelled) => Err(sqlx::Error::Io(std::io::Error::other(cancelled))),
    }
}

async fn create_schema(pool: &AnyPool, schema: &str) -> Result<(), sqlx::Error> {
    match pool
        .execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str())
        .await
    {
        Ok(_) => Ok(()),
        // Two replicas starting together can both miss the schema; the loser
        // of that race sees a unique violation and the schema exists.
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(()),
        Err(e) => Err(e),
    }
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}
