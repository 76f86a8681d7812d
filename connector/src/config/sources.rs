//! Where datasets live beyond the connector's own disk: the `[[databases]]`
//! a dataset may name, and the `[[object_stores]]` its `s3://` path may be
//! in (docs/sources.md).
//!
//! Secrets are never part of the configuration text: a database password
//! is read from the file or environment variable the config names, when
//! the connection is opened, and object-store credentials come from the
//! standard AWS environment variables or a credentials file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::parse_duration;

/// A database datasets may be read from.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub name: String,
    pub kind: DatabaseKind,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Secret,
    pub tls: DatabaseTls,
    /// Connections the connector opens to it at most, for all queries.
    pub max_connections: usize,
    /// How long opening one connection may take.
    pub connect_timeout: Duration,
    /// The database's own `statement_timeout` for every statement Sluice
    /// sends; a query's deadline also cancels it.
    pub statement_timeout: Duration,
    /// Rows fetched per round trip (one Arrow batch).
    pub fetch_rows: usize,
    /// Sends the filters that may be pushed (docs/sources.md) to the
    /// database; `false`: every filter runs in Sluice only.
    pub pushdown: bool,
}

// The password source is named, never its value (there is none here).
impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseKind {
    Postgres,
}

/// Where a password is read from when a connection is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// The file's content, without a trailing newline.
    File(PathBuf),
    /// The environment variable's value.
    Env(String),
    /// No password (trust or certificate authentication).
    None,
}

/// TLS to a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTls {
    /// Plain TCP: only for a database on loopback or a private link.
    Disable,
    /// TLS, the server's certificate verified against `ca` (PEM) and its
    /// name against `host` (libpq's `verify-full`).
    VerifyFull { ca: PathBuf },
}

/// An S3-compatible object store datasets' `s3://bucket/…` paths are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStoreConfig {
    /// `s3://bucket`.
    pub bucket: String,
    /// The store's endpoint (for MinIO, Ceph, moto …); AWS when absent.
    pub endpoint: Option<String>,
    pub region: String,
    /// Allows an `http://` endpoint (loopback or a private link only).
    pub allow_http: bool,
    /// An AWS shared-credentials file and the profile to read from it;
    /// without it, the standard `AWS_*` environment variables.
    pub credentials_file: Option<PathBuf>,
    pub profile: String,
    /// Read public objects without signing (no credentials at all).
    pub anonymous: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    name: String,
    kind: DatabaseKind,
    host: String,
    port: Option<u16>,
    dbname: String,
    user: String,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    tls: Option<String>,
    ca_file: Option<PathBuf>,
    max_connections: Option<usize>,
    connect_timeout: Option<String>,
    statement_timeout: Option<String>,
    fetch_rows: Option<usize>,
    pushdown: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawObjectStore {
    url: String,
    endpoint: Option<String>,
    region: Option<String>,
    allow_http: Option<bool>,
    credentials_file: Option<PathBuf>,
    profile: Option<String>,
    anonymous: Option<bool>,
}

type FieldError = (String, String);

pub(super) fn parse_database(
    raw: RawDatabase,
    resolve: &dyn Fn(&Path) -> PathBuf,
    query_timeout: Duration,
) -> Result<DatabaseConfig, FieldError> {
    let fail = |field: &str, reason: String| Err((field.to_string(), reason));
    if !super::is_identifier(&raw.name) {
        return fail(
            "name",
            format!(
                "`{}` is not a valid name: use lowercase letters, digits and `_`",
                raw.name
            ),
        );
    }
    let password = match (raw.password_file, raw.password_env) {
        (Some(_), Some(_)) => {
            return fail(
                "password_file",
                "give password_file or password_env, not both".into(),
            );
        }
        (Some(file), None) => Secret::File(resolve(&file)),
        (None, Some(var)) => Secret::Env(var),
        (None, None) => Secret::None,
    };
    let tls = match (raw.tls.as_deref().unwrap_or("verify-full"), raw.ca_file) {
        ("disable", None) => DatabaseTls::Disable,
        ("disable", Some(_)) => {
            return fail("ca_file", "a CA file is given but tls is `disable`".into());
        }
        ("verify-full", Some(ca)) => DatabaseTls::VerifyFull { ca: resolve(&ca) },
        ("verify-full", None) => {
            return fail(
                "ca_file",
                "tls = \"verify-full\" (the default) needs the PEM file of the CA that signed the database's certificate; or set tls = \"disable\" for a database on loopback"
                    .into(),
            );
        }
        (other, _) => {
            return fail(
                "tls",
                format!(
                    "`{other}` is not a TLS mode: use \"verify-full\" (certificate and host name verified) or \"disable\""
                ),
            );
        }
    };
    let duration = |field: &str, value: Option<String>, default: Duration| match value {
        Some(s) => parse_duration(&s).map_err(|e| (field.to_string(), e.to_string())),
        None => Ok(default),
    };
    let positive = |field: &str, value: Option<usize>, default: usize| match value {
        Some(0) => Err((field.to_string(), "must be at least 1".to_string())),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    Ok(DatabaseConfig {
        name: raw.name,
        kind: raw.kind,
        host: raw.host,
        port: raw.port.unwrap_or(5432),
        dbname: raw.dbname,
        user: raw.user,
        password,
        tls,
        max_connections: positive("max_connections", raw.max_connections, 4)?,
        connect_timeout: duration(
            "connect_timeout",
            raw.connect_timeout,
            Duration::from_secs(5),
        )?,
        statement_timeout: duration("statement_timeout", raw.statement_timeout, query_timeout)?,
        fetch_rows: positive("fetch_rows", raw.fetch_rows, 8192)?,
        pushdown: raw.pushdown.unwrap_or(true),
    })
}

pub(super) fn parse_object_store(
    raw: RawObjectStore,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<ObjectStoreConfig, FieldError> {
    let bare = raw.url.trim_end_matches('/');
    let bucket = bucket_of(bare)
        .filter(|bucket| bare == format!("s3://{bucket}"))
        .ok_or_else(|| {
            (
                "url".to_string(),
                format!("`{}` is not a bucket URL: write s3://bucket", raw.url),
            )
        })?;
    if let Some(endpoint) = &raw.endpoint
        && endpoint.starts_with("http://")
        && !raw.allow_http.unwrap_or(false)
    {
        return Err((
            "endpoint".into(),
            format!(
                "`{endpoint}` is plain HTTP: use https, or set allow_http = true for a store on loopback or a private link"
            ),
        ));
    }
    Ok(ObjectStoreConfig {
        bucket: bucket.to_string(),
        endpoint: raw.endpoint,
        region: raw.region.unwrap_or_else(|| "us-east-1".into()),
        allow_http: raw.allow_http.unwrap_or(false),
        credentials_file: raw.credentials_file.map(|p| resolve(&p)),
        profile: raw.profile.unwrap_or_else(|| "default".into()),
        anonymous: raw.anonymous.unwrap_or(false),
    })
}

/// `bucket` of `s3://bucket`, or of `s3://bucket/…` with the rest after it.
pub fn bucket_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("s3://")?;
    let bucket = rest.split('/').next()?;
    (!bucket.is_empty()).then_some(bucket)
}
