//! The demo datasets, generated deterministically on first start so that
//! every machine serves byte-identical data (same seed, same rows).
//!
//! * `trips` (Parquet, 1,000,000 rows): synthetic public-transport journeys.
//!   Personal mobility data: `card_id` is the privacy unit.
//! * `machine_events` (CSV, 50,000 rows): synthetic factory telemetry from
//!   three manufacturers, 40 machines each.
//! * `zones` (newline-delimited JSON, 40 rows): public reference data on the
//!   fare zones that `trips` starts and ends in.
//!
//! The demo usage policy over them is `demo_policy.yaml` next to this file.
//!
//! The generators take a seed and a row count, so that `sluice generate`
//! can write other datasets of the same shape for examples; the demo always
//! uses [`TRIPS_SEED`]/[`TRIPS_ROWS`] and [`MACHINE_EVENTS_SEED`]/
//! [`MACHINE_EVENTS_ROWS`]/[`MANUFACTURERS`], which must never change (tests
//! and every existing state directory rely on the demo data's bytes).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use datafusion::arrow::array::{
    ArrayRef, Float64Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::Compression;
use datafusion::parquet::file::properties::WriterProperties;

/// Rows in the demo `trips` table.
pub const TRIPS_ROWS: usize = 1_000_000;
/// Seed of the demo `trips` table.
pub const TRIPS_SEED: u64 = 0x5_1u64 << 32 | 2026;
/// Rows in the demo `machine_events` table.
pub const MACHINE_EVENTS_ROWS: usize = 50_000;
/// Seed of the demo `machine_events` table.
pub const MACHINE_EVENTS_SEED: u64 = 0xFAC7_0221;
/// Rows in the `zones` table (one per fare zone).
pub const ZONES_ROWS: usize = ZONES as usize;

const CARDS: u64 = 60_000;
const ZONES: u64 = 40;
/// 2026-01-01T00:00:00Z in microseconds.
const EPOCH_2026_US: i64 = 1_767_225_600_000_000;
const DAY_US: i64 = 86_400_000_000;
const MINUTE_US: i64 = 60_000_000;

/// The demo usage policy, written to `<state_dir>/policy.yaml` on first start.
pub const DEMO_POLICY: &str = include_str!("demo_policy.yaml");

const DISTRICTS: [&str; 8] = [
    "Old Town",
    "Harbour",
    "North Hills",
    "Riverside",
    "University",
    "Eastgate",
    "Airport",
    "Lakeside",
];

/// Writes the `zones` table to `path` (one JSON object per line).
pub fn write_zones(path: &Path) -> Result<()> {
    let tmp = path.with_extension("json.partial");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::new(file);
    for z in 0..ZONES {
        let district = DISTRICTS[(z % DISTRICTS.len() as u64) as usize];
        let population = 2_000 + mix(z ^ 0x20E5) % 48_000;
        let area = 0.5 + (mix(z ^ 0xA4EA) % 900) as f64 / 100.0;
        writeln!(
            out,
            r#"{{"zone_id":"{}","district":"{district}","population":{population},"area_km2":{area:.2}}}"#,
            zone_name(z)
        )?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// SplitMix64: tiny, fast, and the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Picks an index by cumulative weights (summing to 1).
    fn pick(&mut self, cumulative: &[f64]) -> usize {
        let u = self.unit();
        cumulative
            .iter()
            .position(|c| u < *c)
            .unwrap_or(cumulative.len() - 1)
    }
}

/// A stateless hash, for per-card attributes that must not depend on order.
fn mix(x: u64) -> u64 {
    Rng(x).next_u64()
}

pub fn trips_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("trip_id", DataType::Int64, false),
        Field::new("card_id", DataType::Utf8, false),
        Field::new("start_time", ts.clone(), false),
        Field::new("end_time", ts, false),
        Field::new("start_zone", DataType::Utf8, false),
        Field::new("end_zone", DataType::Utf8, false),
        Field::new("mode", DataType::Utf8, false),
        Field::new("distance_km", DataType::Float64, false),
        Field::new("fare_eur", DataType::Float64, false),
        Field::new("age_band", DataType::Utf8, true),
    ]))
}

const MODES: [&str; 5] = ["bus", "tram", "metro", "bike", "ferry"];
const MODE_CUMULATIVE: [f64; 5] = [0.45, 0.65, 0.90, 0.97, 1.0];
/// Base fare and per-km fare per mode.
const MODE_FARES: [(f64, f64); 5] = [
    (1.2, 0.10),
    (1.2, 0.12),
    (1.5, 0.15),
    (0.5, 0.20),
    (3.0, 0.30),
];
/// Average speed in km/h per mode.
const MODE_SPEED: [f64; 5] = [18.0, 20.0, 32.0, 14.0, 22.0];
const AGE_BANDS: [&str; 6] = ["18-25", "26-35", "36-45", "46-55", "56-65", "66+"];

fn zone_name(z: u64) -> String {
    format!("Z{:02}", z + 1)
}

/// Writes a `trips` table of `rows` journeys generated from `seed` to `path`
/// (Parquet, Snappy, row groups of 131,072). The demo's is
/// `write_trips(path, TRIPS_SEED, TRIPS_ROWS)`.
pub fn write_trips(path: &Path, seed: u64, rows: usize) -> Result<()> {
    let schema = trips_schema();
    let tmp = path.with_extension("parquet.partial");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(131_072))
        .build();
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
    let mut rng = Rng(seed);
    const BATCH: usize = 65_536;
    let mut next_id = 1i64;
    while (next_id as usize) <= rows {
        let n = BATCH.min(rows + 1 - next_id as usize);
        let batch = trips_batch(&schema, &mut rng, next_id, n)?;
        writer.write(&batch)?;
        next_id += n as i64;
    }
    writer.close()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn trips_batch(schema: &SchemaRef, rng: &mut Rng, first_id: i64, n: usize) -> Result<RecordBatch> {
    let mut trip_id = Int64Builder::with_capacity(n);
    let mut card = StringBuilder::with_capacity(n, n * 8);
    let mut start = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut end = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut start_zone = StringBuilder::with_capacity(n, n * 3);
    let mut end_zone = StringBuilder::with_capacity(n, n * 3);
    let mut mode = StringBuilder::with_capacity(n, n * 5);
    let mut distance = Float64Builder::with_capacity(n);
    let mut fare = Float64Builder::with_capacity(n);
    let mut age = StringBuilder::with_capacity(n, n * 5);
    for i in 0..n {
        trip_id.append_value(first_id + i as i64);
        // Skewed card activity: a square of a uniform favours low card numbers.
        let u = rng.unit();
        let card_no = ((u * u) * CARDS as f64) as u64;
        card.append_value(format!("C{card_no:07}"));
        let home = mix(card_no) % ZONES;
        let from = if rng.unit() < 0.5 {
            home
        } else {
            rng.below(ZONES)
        };
        let to = rng.below(ZONES);
        let m = rng.pick(&MODE_CUMULATIVE);
        let km = ((0.3 + rng.unit() * rng.unit() * 24.0) * 100.0).round() / 100.0;
        let minutes = (km / MODE_SPEED[m] * 60.0).ceil() as i64 + 1 + rng.below(6) as i64;
        let day = rng.below(90) as i64;
        // Rush hours around 08:00 and 17:00.
        let hour = if rng.unit() < 0.6 {
            if rng.unit() < 0.5 {
                7 + rng.below(3)
            } else {
                16 + rng.below(3)
            }
        } else {
            5 + rng.below(19)
        } as i64;
        let t0 =
            EPOCH_2026_US + day * DAY_US + hour * 60 * MINUTE_US + rng.below(60) as i64 * MINUTE_US;
        start.append_value(t0);
        end.append_value(t0 + minutes * MINUTE_US);
        start_zone.append_value(zone_name(from));
        end_zone.append_value(zone_name(to));
        mode.append_value(MODES[m]);
        distance.append_value(km);
        let (base, per_km) = MODE_FARES[m];
        fare.append_value(((base + per_km * km) * 100.0).round() / 100.0);
        let a = mix(card_no ^ 0xA6E);
        if a.is_multiple_of(20) {
            age.append_null();
        } else {
            age.append_value(AGE_BANDS[(a >> 8) as usize % AGE_BANDS.len()]);
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(trip_id.finish()),
        Arc::new(card.finish()),
        Arc::new(start.finish()),
        Arc::new(end.finish()),
        Arc::new(start_zone.finish()),
        Arc::new(end_zone.finish()),
        Arc::new(mode.finish()),
        Arc::new(distance.finish()),
        Arc::new(fare.finish()),
        Arc::new(age.finish()),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The manufacturers of the demo `machine_events`, in the order the
/// generator draws them.
pub const MANUFACTURERS: [&str; 3] = ["Kessler Werke", "Nordhavn Motion", "Ostrava Precision"];
/// Machines per manufacturer: serials `<prefix>-<year>-0001` to `-0040`.
pub const MACHINES_PER_MANUFACTURER: u64 = 40;
const SITES: [&str; 4] = ["Plant A", "Plant B", "Plant C", "Plant D"];
const EVENT_TYPES: [&str; 4] = ["run", "idle", "fault", "maintenance"];
const EVENT_CUMULATIVE: [f64; 4] = [0.62, 0.88, 0.95, 1.0];

/// The serial-number prefix of a manufacturer: the initials of its first
/// two words, or the first two letters or digits of a one-word name
/// (`Kessler Werke` → `KW`), upper case.
pub fn serial_prefix(manufacturer: &str) -> String {
    let words: Vec<&str> = manufacturer
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let chars: String = match words.as_slice() {
        [] => String::new(),
        [one] => one.chars().take(2).collect(),
        [first, second, ..] => first
            .chars()
            .take(1)
            .chain(second.chars().take(1))
            .collect(),
    };
    chars.to_uppercase()
}

/// Checks manufacturer names for [`write_machine_events`] and returns each
/// with its serial prefix: names must be distinct, contain a letter or
/// digit, fit in a CSV field unquoted (no comma, quote or line break, no
/// surrounding spaces) and give distinct serial prefixes.
pub fn manufacturer_prefixes<S: AsRef<str>>(names: &[S]) -> Result<Vec<(String, String)>> {
    if names.is_empty() {
        anyhow::bail!("no manufacturer given");
    }
    let mut checked: Vec<(String, String)> = Vec::with_capacity(names.len());
    for name in names {
        let name = name.as_ref();
        if name.trim() != name || name.is_empty() {
            anyhow::bail!("manufacturer `{name}`: leading or trailing spaces, or empty");
        }
        if let Some(c) = name.chars().find(|c| matches!(c, ',' | '"' | '\n' | '\r')) {
            anyhow::bail!(
                "manufacturer `{}`: {c:?} is not allowed (the name is written to a CSV field as is)",
                name.escape_debug()
            );
        }
        if name.chars().count() > 64 {
            anyhow::bail!("manufacturer `{name}`: longer than 64 characters");
        }
        let prefix = serial_prefix(name);
        if prefix.is_empty() {
            anyhow::bail!("manufacturer `{name}`: needs at least one letter or digit");
        }
        for (other, other_prefix) in &checked {
            if other == name {
                anyhow::bail!("manufacturer `{name}` is given twice");
            }
            if *other_prefix == prefix {
                anyhow::bail!(
                    "manufacturers `{other}` and `{name}` would share the machine-serial prefix `{prefix}`: rename one"
                );
            }
        }
        checked.push((name.to_string(), prefix));
    }
    Ok(checked)
}

/// Writes a `machine_events` table of `rows` events generated from `seed`
/// to `path` (CSV with header), for the given manufacturers with
/// [`MACHINES_PER_MANUFACTURER`] machines each. The demo's is
/// `write_machine_events(path, MACHINE_EVENTS_SEED, MACHINE_EVENTS_ROWS, &MANUFACTURERS)`.
pub fn write_machine_events<S: AsRef<str>>(
    path: &Path,
    seed: u64,
    rows: usize,
    manufacturers: &[S],
) -> Result<()> {
    let manufacturers = manufacturer_prefixes(manufacturers)?;
    let tmp = path.with_extension("csv.partial");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::new(file);
    writeln!(
        out,
        "event_id,machine_serial,manufacturer,site,event_time,event_type,temperature_c,vibration_mm_s,energy_kwh,fault_code"
    )?;
    let mut rng = Rng(seed);
    for id in 1..=rows as u64 {
        let (maker, prefix) = &manufacturers[rng.below(manufacturers.len() as u64) as usize];
        let machine = rng.below(MACHINES_PER_MANUFACTURER);
        let serial = format!(
            "{prefix}-{:04}-{:04}",
            2000 + mix(machine) % 100,
            machine + 1
        );
        let site = SITES[(mix(machine ^ 0x517E) % SITES.len() as u64) as usize];
        let kind = rng.pick(&EVENT_CUMULATIVE);
        let seconds = rng.below(90 * 86_400);
        let (day, rest) = (seconds / 86_400, seconds % 86_400);
        let (month, dom) = month_day(day);
        let time = format!(
            "2026-{month:02}-{dom:02}T{:02}:{:02}:{:02}",
            rest / 3600,
            rest / 60 % 60,
            rest % 60
        );
        let temperature = 35.0 + rng.unit() * 40.0 + if kind == 2 { 15.0 } else { 0.0 };
        let vibration = rng.unit() * rng.unit() * 12.0;
        let energy = if kind == 0 {
            2.0 + rng.unit() * 30.0
        } else {
            rng.unit() * 2.0
        };
        // Sensors drop out now and then: empty fields are NULL.
        let sensor = |v: f64, rng: &mut Rng| {
            if rng.below(50) == 0 {
                String::new()
            } else {
                format!("{v:.2}")
            }
        };
        let t = sensor(temperature, &mut rng);
        let v = sensor(vibration, &mut rng);
        let fault = if kind == 2 {
            format!("E-{}", 100 + rng.below(24))
        } else {
            String::new()
        };
        writeln!(
            out,
            "{id},{serial},{maker},{site},{time},{},{t},{v},{energy:.3},{fault}",
            EVENT_TYPES[kind]
        )?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Day of 2026 (0-based, < 90) to (month, day of month).
fn month_day(day: u64) -> (u64, u64) {
    match day {
        0..=30 => (1, day + 1),
        31..=58 => (2, day - 30),
        _ => (3, day - 58),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic() {
        let a: Vec<u64> = (0..3)
            .map({
                let mut r = Rng(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..3)
            .map({
                let mut r = Rng(7);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn month_day_covers_the_quarter() {
        assert_eq!(month_day(0), (1, 1));
        assert_eq!(month_day(30), (1, 31));
        assert_eq!(month_day(31), (2, 1));
        assert_eq!(month_day(58), (2, 28));
        assert_eq!(month_day(59), (3, 1));
        assert_eq!(month_day(89), (3, 31));
    }

    #[test]
    fn trips_batches_match_the_schema() {
        let schema = trips_schema();
        let batch = trips_batch(&schema, &mut Rng(1), 1, 1000).unwrap();
        assert_eq!(batch.num_rows(), 1000);
        assert_eq!(batch.schema(), schema);
    }

    #[test]
    fn machine_events_are_byte_identical_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
        for path in [&a, &b] {
            write_machine_events(
                path,
                MACHINE_EVENTS_SEED,
                MACHINE_EVENTS_ROWS,
                &MANUFACTURERS,
            )
            .unwrap();
        }
        let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert_eq!(a, b);
        let lines = a.iter().filter(|c| **c == b'\n').count();
        assert_eq!(lines, MACHINE_EVENTS_ROWS + 1);
    }

    /// The demo's bytes are pinned: every existing state directory and the
    /// tests' expected answers rely on them. `trips` is pinned the same way
    /// by its generator (seed, rows, batch sizes); it is too slow to write
    /// in a unit test.
    #[test]
    fn demo_machine_events_keep_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine_events.csv");
        write_machine_events(
            &path,
            MACHINE_EVENTS_SEED,
            MACHINE_EVENTS_ROWS,
            &MANUFACTURERS,
        )
        .unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).unwrap());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "04c0658347f0c2bd83aa13be57783d9358db81277adda6692f0b4b759065b092"
        );
    }

    #[test]
    fn serial_prefixes_and_manufacturer_checks() {
        let demo = manufacturer_prefixes(&MANUFACTURERS).unwrap();
        let prefixes: Vec<&str> = demo.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(prefixes, ["KW", "NM", "OP"]);
        assert_eq!(serial_prefix("acme"), "AC");
        assert_eq!(serial_prefix("Müller & Söhne GmbH"), "MS");
        for (names, error) in [
            (vec![], "no manufacturer"),
            (vec!["Kessler Werke", "Kessler Werke"], "given twice"),
            (
                vec!["Kessler Werke", "Kappa Works"],
                "share the machine-serial prefix `KW`",
            ),
            (vec!["Acme, Inc"], "not allowed"),
            (vec![" Acme"], "spaces"),
            (vec!["--"], "at least one letter"),
        ] {
            let message = manufacturer_prefixes(&names).unwrap_err().to_string();
            assert!(message.contains(error), "{names:?}: {message}");
        }
    }
}
