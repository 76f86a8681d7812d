//! SQL sent to a broker → `broker::decompose::decompose` (parse, the
//! provider's limits on depth and size, split into partial queries per
//! provider and a merge query) → `broker::merge::precheck` (the merge query
//! planned by DataFusion over stand-in partials), as the broker's
//! GetFlightInfo runs them before it asks any provider. Nothing is sent.
//!
//! Input: the SQL text.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice::broker::config::BrokerConfig;
use sluice::broker::{decompose, merge};

/// The broker of docs/federation.md: `trips` federated over two providers.
const BROKER_TOML: &str = r#"
[tls]
cert = "pki/broker-server.pem"
key = "pki/broker-server.key"
client_ca = "pki/ca.pem"

[upstream]
cert = "pki/broker.pem"
key = "pki/broker.key"
ca = "pki/ca.pem"

[access]
consumers = [{ organization = "City Planning Agency" }]

[[providers]]
name = "north"
endpoint = "grpc+tls://north.example:50051"

[[providers]]
name = "south"
endpoint = "grpc+tls://south.example:50051"

[[federated]]
name = "trips"
sources = { north = "trips", south = "trips_2026" }

[[federated]]
name = "machine_events"
sources = { north = "machine_events" }
"#;

fn config() -> &'static BrokerConfig {
    static CONFIG: OnceLock<BrokerConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        BrokerConfig::from_toml_str(BROKER_TOML, &sluice_fuzz::scratch().join("broker.toml"))
            .expect("the broker config loads")
    })
}

fuzz_target!(|data: &[u8]| {
    // Flight SQL carries the statement as a protobuf string: UTF-8.
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(federated) = decompose::decompose(sql, config()) else {
        return;
    };
    assert!(!federated.partial_sql.is_empty());
    sluice_fuzz::run(async move {
        let _ = merge::precheck(&federated).await;
    });
});
