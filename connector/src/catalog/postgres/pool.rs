//! Connections to one `[[databases]]` entry: at most `max_connections`,
//! opened within `connect_timeout`, each running every statement under the
//! configured `statement_timeout`, reused while healthy.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::config::SslMode;
use tokio_postgres::{CancelToken, Client, NoTls};

use super::tls::MakeRustls;
use crate::catalog::SourceFault;
use crate::config::{DatabaseConfig, DatabaseTls};

/// Why a connection could not be opened. The message is for the log: it
/// may name the host, never the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the password could not be read: {0}")]
    Password(String),
    #[error("TLS to the database cannot be set up: {0}")]
    Tls(#[from] super::tls::CaFileError),
    #[error("connecting took longer than connect_timeout")]
    TimedOut,
    #[error(transparent)]
    Driver(#[from] tokio_postgres::Error),
}

impl ConnectError {
    pub fn fault(&self) -> SourceFault {
        match self {
            ConnectError::Driver(e) if e.code().is_some() => super::classify(e),
            _ => SourceFault::Unreachable,
        }
    }
}

/// One database and its pool of connections.
pub struct Database {
    config: DatabaseConfig,
    tls: Option<MakeRustls>,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Client>>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// The pool for `config`; nothing is connected yet. Fails only when its
    /// CA file cannot be read.
    pub fn new(config: DatabaseConfig) -> Result<Self, ConnectError> {
        let tls = match &config.tls {
            DatabaseTls::Disable => None,
            DatabaseTls::VerifyFull { ca } => Some(MakeRustls::new(ca)?),
        };
        Ok(Self {
            permits: Arc::new(Semaphore::new(config.max_connections)),
            tls,
            idle: Mutex::new(Vec::new()),
            config,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &DatabaseConfig {
        &self.config
    }

    /// A connection for one scan: an idle one, or a new one once fewer than
    /// `max_connections` are open. Waits for one to be returned otherwise
    /// (the query's deadline bounds the wait).
    pub async fn checkout(self: &Arc<Self>) -> Result<Pooled, ConnectError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ConnectError::TimedOut)?;
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reused {
            Some(client) => client,
            None => self.connect().await?,
        };
        Ok(Pooled {
            client: Some(client),
            clean: false,
            db: self.clone(),
            _permit: permit,
        })
    }

    /// A new connection, outside the pool (for the startup description).
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let c = &self.config;
        let mut pg = tokio_postgres::Config::new();
        pg.host(&c.host)
            .port(c.port)
            .dbname(&c.dbname)
            .user(&c.user)
            .application_name("sluice")
            .connect_timeout(c.connect_timeout)
            .keepalives(true)
            // Every statement is bounded by the database itself, and string
            // constants in pushed filters mean what they say.
            .options(format!(
                "-c statement_timeout={} -c standard_conforming_strings=on -c default_transaction_read_only=on",
                c.statement_timeout.as_millis().max(1)
            ));
        if let Some(password) = super::password(c)? {
            pg.password(password);
        }
        // connect_timeout covers each TCP connect; the whole handshake
        // (TLS, authentication) is bounded here.
        let limit = c.connect_timeout * 2;
        let client = match &self.tls {
            None => {
                pg.ssl_mode(SslMode::Disable);
                let (client, connection) = tokio::time::timeout(limit, pg.connect(NoTls))
                    .await
                    .map_err(|_| ConnectError::TimedOut)??;
                tokio::spawn(connection);
                client
            }
            Some(tls) => {
                pg.ssl_mode(SslMode::Require);
                let (client, connection) = tokio::time::timeout(limit, pg.connect(tls.clone()))
                    .await
                    .map_err(|_| ConnectError::TimedOut)??;
                tokio::spawn(connection);
                client
            }
        };
        Ok(client)
    }

    /// Cancels the statement running on the connection `token` is of.
    pub async fn cancel(&self, token: CancelToken) {
        let limit = self.config.connect_timeout;
        let cancelled = match &self.tls {
            None => tokio::time::timeout(limit, token.cancel_query(NoTls)).await,
            Some(tls) => tokio::time::timeout(limit, token.cancel_query(tls.clone())).await,
        };
        if !matches!(cancelled, Ok(Ok(()))) {
            tracing::warn!(database = %self.config.name, "cancelling a statement on the database failed; its statement_timeout ends it");
        }
    }
}

/// A connection taken from the pool. Dropped without [`Pooled::release`]
/// (a failed or abandoned scan), it is closed rather than reused: it may be
/// in the middle of a transaction.
pub struct Pooled {
    client: Option<Client>,
    clean: bool,
    db: Arc<Database>,
    _permit: OwnedSemaphorePermit,
}

impl Pooled {
    /// Marks the connection as idle and healthy: it goes back to the pool.
    pub fn release(&mut self) {
        self.clean = true;
    }
}

impl std::ops::Deref for Pooled {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && self.clean
            && !client.is_closed()
        {
            self.db
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(client);
        }
    }
}
