//! A configuration file → `Config::from_toml_str` (what `Config::load` runs
//! on the file's text for `serve` and `config check`: TOML, unknown keys,
//! sizes, durations, addresses, dataset schemas, limits) and, when it
//! loads, `Config::check_paths` (file-system checks only: `stat`). The same
//! text also goes to the broker's loader, `BrokerConfig::from_toml_str`
//! (`sluice broker --config`), and its `check_paths`.
//!
//! Input: the TOML text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::broker::config::BrokerConfig;
use sluice::config::Config;

fuzz_target!(|data: &[u8]| {
    // The loaders read the file into a String first (`read_file`): text
    // that is not UTF-8 is refused before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = sluice_fuzz::scratch().join("sluice.toml");
    if let Ok(config) = Config::from_toml_str(text, &path) {
        let _ = config.check_paths();
        let _ = format!("{config:?}");
    }
    if let Ok(broker) = BrokerConfig::from_toml_str(text, &path) {
        let _ = broker.check_paths();
        let _ = broker.table("trips");
    }
});
