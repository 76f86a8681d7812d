//! Mutual TLS and identity: who may connect, and who the connector thinks
//! they are. Certificates are made with `sluice certs`, the tool operators use.

mod common;

use std::path::Path;

use common::{Daemon, sluice};
use sluice_proto::v1::WhoAmIRequest;
use sluice_proto::v1::connector_service_client::ConnectorServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn certs(dir: &Path, args: &[&str]) {
    let out = sluice()
        .arg("certs")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sluice certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory holding a copy of the demo CA, to issue odd client
/// certificates that chain to the CA the daemon trusts.
fn demo_ca_copy(daemon: &Daemon) -> tempfile::TempDir {
    let dir = common::temp_dir();
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(daemon.pki().join(file), dir.path().join(file)).unwrap();
    }
    dir
}

/// True if a WhoAmI call over these files succeeds.
async fn accepted(daemon: &Daemon, ca: &Path, cert: &Path, key: &Path) -> Result<String, String> {
    let channel = daemon
        .channel_with(ca, cert, key)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let me = ConnectorServiceClient::new(channel)
        .who_am_i(WhoAmIRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(me.into_inner().principal_id)
}

#[tokio::test]
async fn demo_identities_are_accepted_with_their_san_uri() {
    let daemon = Daemon::start();
    let pki = daemon.pki();
    for (name, uri) in [
        ("planning", "spiffe://sluice.demo/org/city-planning"),
        ("supplier", "spiffe://sluice.demo/org/axle-suppliers"),
    ] {
        let id = accepted(
            &daemon,
            &pki.join("ca.pem"),
            &pki.join(format!("{name}.pem")),
            &pki.join(format!("{name}.key")),
        )
        .await
        .unwrap();
        assert_eq!(id, uri);
    }
}

#[tokio::test]
async fn negative_matrix_is_refused() {
    let daemon = Daemon::start();
    let ca = daemon.pki().join("ca.pem");
    let demo_ca = demo_ca_copy(&daemon);
    let d = demo_ca.path();
    certs(
        d,
        &[
            "client",
            "--name",
            "expired",
            "--org",
            "Late",
            "--not-before",
            "2020-01-01",
            "--not-after",
            "2021-01-01",
        ],
    );
    certs(
        d,
        &[
            "client",
            "--name",
            "future",
            "--org",
            "Early",
            "--not-before",
            "2098-01-01",
            "--not-after",
            "2099-01-01",
        ],
    );
    let other = common::temp_dir();
    certs(other.path(), &["ca", "--name", "Impostor CA"]);
    certs(
        other.path(),
        &[
            "client",
            "--name",
            "impostor",
            "--org",
            "Demo",
            "--uri",
            "spiffe://sluice.demo/org/city-planning",
        ],
    );

    let cases = [
        ("expired", d.join("expired.pem"), d.join("expired.key")),
        ("not yet valid", d.join("future.pem"), d.join("future.key")),
        (
            "signed by another CA",
            other.path().join("impostor.pem"),
            other.path().join("impostor.key"),
        ),
        // A server certificate lacks the clientAuth extended key usage.
        (
            "server certificate used as client",
            daemon.pki().join("server.pem"),
            daemon.pki().join("server.key"),
        ),
    ];
    for (what, cert, key) in cases {
        let result = accepted(&daemon, &ca, &cert, &key).await;
        assert!(result.is_err(), "{what}: accepted as {result:?}");
    }

    // No client certificate at all.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()))
        .domain_name("localhost");
    let result = match Endpoint::from_shared(format!("https://{}", daemon.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
    {
        Err(e) => Err(e.to_string()),
        Ok(channel) => ConnectorServiceClient::new(channel)
            .who_am_i(WhoAmIRequest {})
            .await
            .map(|r| r.into_inner().principal_id)
            .map_err(|s| format!("{:?}", s.code())),
    };
    assert!(
        result.is_err(),
        "no client certificate: accepted as {result:?}"
    );

    // A plaintext client is refused too.
    let plain = Endpoint::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let r = ConnectorServiceClient::new(channel)
            .who_am_i(WhoAmIRequest {})
            .await;
        assert!(r.is_err(), "plaintext accepted");
    }

    // None of that disturbed the server.
    let id = accepted(
        &daemon,
        &ca,
        &daemon.pki().join("planning.pem"),
        &daemon.pki().join("planning.key"),
    )
    .await;
    assert!(id.is_ok(), "{id:?}");
}

#[tokio::test]
async fn a_pki_made_with_sluice_certs_runs_a_real_deployment() {
    let pki = common::temp_dir();
    let p = pki.path();
    certs(
        p,
        &[
            "ca",
            "--name",
            "Transit Agency CA",
            "--org",
            "Transit Agency",
        ],
    );
    certs(
        p,
        &[
            "server",
            "--name",
            "connector",
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
        ],
    );
    certs(
        p,
        &[
            "client",
            "--name",
            "planner",
            "--org",
            "Planning Agency",
            "--uri",
            "spiffe://city.example/org/planning",
        ],
    );
    certs(
        p,
        &[
            "client",
            "--name",
            "bare",
            "--cn",
            "analyst-7",
            "--org",
            "Statistics Office",
        ],
    );
    // Refuses to overwrite without --force.
    let again = sluice()
        .args(["certs", "ca", "--dir"])
        .arg(p)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let config = p.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = \"connector.pem\"\nkey = \"connector.key\"\nclient_ca = \"ca.pem\"\n\n\
             [[datasets]]\nname = \"events\"\nformat = \"csv\"\npath = \"{}\"\n",
            common::shared_state_dir()
                .join("data/machine_events.csv")
                .display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start_config(&config);
    let ca = p.join("ca.pem");
    let id = accepted(&daemon, &ca, &p.join("planner.pem"), &p.join("planner.key"))
        .await
        .unwrap();
    assert_eq!(id, "spiffe://city.example/org/planning");
    let id = accepted(&daemon, &ca, &p.join("bare.pem"), &p.join("bare.key"))
        .await
        .unwrap();
    assert_eq!(id, "O=Statistics Office,CN=analyst-7");

    // The demo identities belong to another CA and are refused here.
    let demo = common::shared_state_dir().join("pki");
    let refused = accepted(
        &daemon,
        &ca,
        &demo.join("planning.pem"),
        &demo.join("planning.key"),
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");

    // The private keys were written owner-only.
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca.key", "connector.key", "planner.key"] {
        let mode = std::fs::metadata(p.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
}
