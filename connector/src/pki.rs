//! Certificates for mTLS: a certificate authority, server certificates and
//! client certificates that carry the identity policies match on.
//!
//! Used by `sluice certs` for real deployments and by the state directory to
//! create the development PKI on first start. Keys are ECDSA P-256, generated
//! at run time and written with mode 0600; nothing here is ever committed.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The roles of a distributed deployment's own processes, carried as a SAN
/// URI. A worker serves only certificates with [`Role::Coordinator`]; the
/// connector's consumer-facing services refuse any certificate with a role,
/// so neither kind of certificate can stand in for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A connector that sends plan fragments to workers (a client certificate).
    Coordinator,
    /// A `sluice worker` (a server certificate).
    Worker,
}

/// Every role URI starts with this.
pub const ROLE_URI_PREFIX: &str = "urn:sluice:role:";

impl Role {
    pub fn uri(self) -> &'static str {
        match self {
            Role::Coordinator => "urn:sluice:role:coordinator",
            Role::Worker => "urn:sluice:role:worker",
        }
    }
}

/// A PEM certificate and its PEM private key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Validity window of a new certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (tolerates clock skew) for `days` days.
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
}

/// What a client certificate says about its holder.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub common_name: String,
    pub organization: Option<String>,
    /// URI SANs, e.g. `spiffe://city.example/org/planning`; the first one
    /// becomes the principal id.
    pub uris: Vec<String>,
}

/// Creates a self-signed CA.
pub fn create_ca(
    common_name: &str,
    organization: Option<&str>,
    validity: Validity,
) -> Result<Issued> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name, organization);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, validity);
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A CA loaded from its PEM certificate and key, ready to issue.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self> {
        let cert_pem = fs::read_to_string(cert_path)
            .with_context(|| format!("reading CA certificate {}", cert_path.display()))?;
        let key_pem = fs::read_to_string(key_path)
            .with_context(|| format!("reading CA key {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("{} is not a usable CA certificate", cert_path.display()))?;
        Ok(Self { issuer })
    }

    /// Issues a TLS server certificate for the given DNS names and IPs.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Issued> {
        self.issue_server_with_role(dns_names, ips, None, validity)
    }

    /// [`Authority::issue_server`], for a process of the deployment itself.
    pub fn issue_server_with_role(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        role: Option<Role>,
        validity: Validity,
    ) -> Result<Issued> {
        if dns_names.is_empty() && ips.is_empty() {
            bail!("a server certificate needs at least one DNS name or IP address");
        }
        let key = KeyPair::generate()?;
        let cn = dns_names
            .first()
            .cloned()
            .unwrap_or_else(|| ips[0].to_string());
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&cn, None);
        for dns in dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                dns.as_str()
                    .try_into()
                    .with_context(|| format!("`{dns}` is not a valid DNS name"))?,
            ));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        if let Some(role) = role {
            params
                .subject_alt_names
                .push(SanType::URI(role.uri().try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // A connector's certificate also authenticates it as a client: the
        // DSP messages it sends to consumers' callbacks (docs/dsp.md). A
        // worker's serves only.
        params.extended_key_usages = match role {
            Some(_) => vec![ExtendedKeyUsagePurpose::ServerAuth],
            None => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a TLS client certificate carrying `who`. Role URIs are
    /// refused: a consumer's certificate must never open a worker.
    pub fn issue_client(&self, who: &ClientIdentity, validity: Validity) -> Result<Issued> {
        if let Some(uri) = who.uris.iter().find(|u| u.starts_with(ROLE_URI_PREFIX)) {
            bail!(
                "`{uri}` is a role of the deployment's own processes, not a consumer's identity: issue it with `sluice certs coordinator`"
            );
        }
        self.issue_client_unchecked(who, validity)
    }

    /// A coordinator's client certificate: it may call workers, and only
    /// workers (see [`Role`]).
    pub fn issue_coordinator(&self, common_name: &str, validity: Validity) -> Result<Issued> {
        let who = ClientIdentity {
            common_name: common_name.into(),
            organization: None,
            uris: vec![Role::Coordinator.uri().into()],
        };
        self.issue_client_unchecked(&who, validity)
    }

    fn issue_client_unchecked(&self, who: &ClientIdentity, validity: Validity) -> Result<Issued> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&who.common_name, who.organization.as_deref());
        for uri in &who.uris {
            params.subject_alt_names.push(SanType::URI(
                uri.as_str()
                    .try_into()
                    .with_context(|| format!("`{uri}` is not a valid URI"))?,
            ));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Server authentication too: a DSP consumer serves its callback
        // endpoint with its own certificate, which the provider pins to the
        // principal that negotiated (it names no host, so it cannot pass
        // for any server reached by name).
        // A coordinator's certificate is a client's only.
        let role = who.uris.iter().any(|u| u.starts_with(ROLE_URI_PREFIX));
        params.extended_key_usages = match role {
            true => vec![ExtendedKeyUsagePurpose::ClientAuth],
            false => vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
        };
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
}

/// Checks that `cert` holds a PEM X.509 certificate and `key` a PEM
/// (PKCS#8) private key whose public half is the certificate's, naming
/// the file at fault. TLS would otherwise find out only when it serves,
/// with a message that names neither file.
pub fn check_pair(cert: &Path, key: &Path) -> Result<()> {
    let cert_pem = fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let key_pem = fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let not_a_certificate = || {
        anyhow::anyhow!(
            "{} is not a usable certificate (expected a PEM X.509 certificate)",
            cert.display()
        )
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&cert_pem).map_err(|_| not_a_certificate())?;
    let parsed = pem.parse_x509().map_err(|_| not_a_certificate())?;
    let pair = KeyPair::from_pem(&key_pem).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a usable private key (expected PEM, PKCS#8): {e}",
            key.display()
        )
    })?;
    if rcgen::PublicKeyData::der_bytes(&pair)
        != parsed.public_key().subject_public_key.data.as_ref()
    {
        bail!(
            "{} does not belong to {} (their public keys differ)",
            key.display(),
            cert.display()
        );
    }
    Ok(())
}

/// Paths of a certificate and key named `name` in `dir`: `NAME.pem`, `NAME.key`.
pub fn pair_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// Writes `NAME.pem` and `NAME.key` (mode 0600) into `dir`, refusing to
/// overwrite existing files unless `overwrite`.
pub fn write_pair(
    dir: &Path,
    name: &str,
    issued: &Issued,
    overwrite: bool,
) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = pair_paths(dir, name);
    if !overwrite {
        for p in [&cert, &key] {
            if p.exists() {
                bail!(
                    "{} already exists (pass --force to replace it)",
                    p.display()
                );
            }
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file(&key, issued.key_pem.as_bytes(), 0o600)?;
    write_file(&cert, issued.cert_pem.as_bytes(), 0o644)?;
    Ok((cert, key))
}

/// Writes a file atomically (temp file + rename) with the given Unix mode.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_checked_file_by_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_ca("test CA", None, Validity::days_from_now(1)).unwrap();
        let (cert, key) = write_pair(dir.path(), "ca", &ca, false).unwrap();
        check_pair(&cert, &key).unwrap();
        let other = create_ca("other", None, Validity::days_from_now(1)).unwrap();
        let (_, other_key) = write_pair(dir.path(), "other", &other, false).unwrap();
        let wrong = check_pair(&cert, &other_key).unwrap_err().to_string();
        assert!(wrong.contains("does not belong to"), "{wrong}");
        fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let bad_key = check_pair(&cert, &key).unwrap_err().to_string();
        assert!(bad_key.contains("not a usable private key"), "{bad_key}");
        fs::write(&cert, "hello").unwrap();
        let bad_cert = check_pair(&cert, &other_key).unwrap_err().to_string();
        assert!(bad_cert.contains("not a usable certificate"), "{bad_cert}");
    }
}
