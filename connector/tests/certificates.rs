//! Certificates: the PKI `sluice certs` and the development PKI issue, and
//! the principal the connector derives from a client certificate (first
//! SAN URI, else the subject's O and CN).

use sluice::identity::principal_from_der;
use sluice::pki::{Authority, ClientIdentity, Validity, create_ca, write_pair};

#[test]
fn issues_server_and_client_certificates_from_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = create_ca("Test CA", Some("Test"), Validity::days_from_now(1)).unwrap();
    write_pair(dir.path(), "ca", &ca, false).unwrap();
    let authority =
        Authority::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key")).unwrap();
    let server = authority
        .issue_server(
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            Validity::days_from_now(1),
        )
        .unwrap();
    assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let client = authority
        .issue_client(
            &ClientIdentity {
                common_name: "analyst".into(),
                organization: Some("Org".into()),
                uris: vec!["spiffe://example.org/org/a".into()],
            },
            Validity::days_from_now(1),
        )
        .unwrap();
    let der = rustls_pemfile_der(&client.cert_pem);
    let principal = principal_from_der(&der).unwrap();
    assert_eq!(principal.id, "spiffe://example.org/org/a");
    assert_eq!(principal.organization.as_deref(), Some("Org"));
    // Existing files are not overwritten by accident.
    assert!(write_pair(dir.path(), "ca", &ca, false).is_err());
}

fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents
}

fn client_der(who: ClientIdentity) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let ca = create_ca("CA", None, Validity::days_from_now(1)).unwrap();
    write_pair(dir.path(), "ca", &ca, false).unwrap();
    let auth = Authority::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key")).unwrap();
    let issued = auth.issue_client(&who, Validity::days_from_now(1)).unwrap();
    x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes())
        .unwrap()
        .1
        .contents
}

#[test]
fn san_uri_wins_over_subject() {
    let der = client_der(ClientIdentity {
        common_name: "bob".into(),
        organization: Some("Acme".into()),
        uris: vec!["spiffe://acme.example/org/acme".into(), "urn:x:y".into()],
    });
    let p = principal_from_der(&der).unwrap();
    assert_eq!(p.id, "spiffe://acme.example/org/acme");
    assert_eq!(p.san_uris.len(), 2);
    assert_eq!(p.common_name.as_deref(), Some("bob"));
}

#[test]
fn subject_o_cn_without_san_uri() {
    let der = client_der(ClientIdentity {
        common_name: "bob".into(),
        organization: Some("Acme GmbH".into()),
        uris: vec![],
    });
    assert_eq!(principal_from_der(&der).unwrap().id, "O=Acme GmbH,CN=bob");
}

#[test]
fn garbage_is_refused() {
    assert!(principal_from_der(b"not a certificate").is_err());
}
