//! S3-compatible object stores datasets are read from.
//!
//! One store per bucket that a dataset's `s3://bucket/…` path names,
//! configured by its `[[object_stores]]` entry (endpoint, region,
//! credentials file) or, without one, by the standard `AWS_*` environment
//! variables alone. Credentials are never read from the configuration
//! text. Requests are bounded (connect and request timeouts, two retries
//! within 20 s), so that an unreachable store fails a query instead of
//! holding it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use crate::config::ObjectStoreConfig;

/// Why an object store cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("credentials_file {path}: {reason}")]
    CredentialsFile { path: String, reason: String },
    #[error(
        "no credentials for bucket `{bucket}`: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, name a credentials_file in its [[object_stores]] entry, or set anonymous = true for a public bucket"
    )]
    NoCredentials { bucket: String },
    #[error("bucket `{bucket}`: {source}")]
    Build {
        bucket: String,
        #[source]
        source: object_store::Error,
    },
}

/// The store for `bucket`, configured by `config` if the bucket has an
/// `[[object_stores]]` entry.
pub fn s3_store(
    bucket: &str,
    config: Option<&ObjectStoreConfig>,
) -> Result<Arc<AmazonS3>, StoreError> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 2,
            retry_timeout: Duration::from_secs(20),
        })
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(60))
                .with_allow_http(config.is_some_and(|c| c.allow_http)),
        );
    let anonymous = config.is_some_and(|c| c.anonymous);
    if let Some(c) = config {
        builder = builder.with_region(&c.region);
        if let Some(endpoint) = &c.endpoint {
            // S3-compatible servers (MinIO, Ceph, moto) address buckets by
            // path.
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        if let Some(file) = &c.credentials_file {
            let keys = read_credentials(file, &c.profile)?;
            builder = builder
                .with_access_key_id(keys.access_key_id)
                .with_secret_access_key(keys.secret_access_key);
            if let Some(token) = keys.session_token {
                builder = builder.with_token(token);
            }
        }
    }
    let has_keys = config.is_some_and(|c| c.credentials_file.is_some())
        || std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
    if anonymous {
        builder = builder.with_skip_signature(true);
    } else if !has_keys {
        // Without keys the client would ask the cloud's instance metadata
        // service, and a query would wait for that to time out.
        return Err(StoreError::NoCredentials {
            bucket: bucket.to_string(),
        });
    }
    builder
        .build()
        .map(Arc::new)
        .map_err(|source| StoreError::Build {
            bucket: bucket.to_string(),
            source,
        })
}

struct Keys {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// `profile`'s keys from an AWS shared-credentials file (INI:
/// `[profile]`, then `aws_access_key_id = …` lines).
fn read_credentials(path: &Path, profile: &str) -> Result<Keys, StoreError> {
    let fail = |reason: String| StoreError::CredentialsFile {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !in_profile {
            continue;
        }
        let value = value.trim().to_string();
        match key.trim() {
            "aws_access_key_id" => id = Some(value),
            "aws_secret_access_key" => secret = Some(value),
            "aws_session_token" => token = Some(value),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Keys {
            access_key_id,
            secret_access_key,
            session_token: token,
        }),
        _ => Err(fail(format!(
            "profile [{profile}] needs aws_access_key_id and aws_secret_access_key"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_read_from_a_shared_credentials_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        std::fs::write(
            &file,
            "[default]\naws_access_key_id = A\naws_secret_access_key = first-secret\n\n[lake]\n# comment\naws_access_key_id=C\naws_secret_access_key = second-secret\naws_session_token = E\n",
        )
        .unwrap();
        let keys = read_credentials(&file, "lake").unwrap();
        assert_eq!(
            (
                keys.access_key_id.as_str(),
                keys.secret_access_key.as_str(),
                keys.session_token.as_deref()
            ),
            ("C", "second-secret", Some("E"))
        );
        let e = read_credentials(&file, "other").err().unwrap().to_string();
        assert!(e.contains("profile [other]"), "{e}");
        // The error names the file and the profile, never a key.
        assert!(!e.contains("-secret"), "{e}");
    }
}
