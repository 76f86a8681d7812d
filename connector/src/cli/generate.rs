//! `sluice generate`: writes the synthetic datasets of the demo, or others of
//! the same shape from another seed and size, for examples and tests.
//!
//! ```text
//! sluice generate trips --out trips.parquet [--seed N] [--rows N]
//! sluice generate machine-events --out events.csv [--seed N] [--rows N] [--manufacturer NAME]…
//! sluice generate zones --out zones.json
//! ```
//!
//! Without `--seed`, `--rows` and `--manufacturer` the files are the demo's,
//! byte for byte. The same arguments always give the same bytes.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use sluice::dev::demo;

/// Most rows one `sluice generate` writes.
const MAX_ROWS: usize = 100_000_000;

#[derive(Subcommand)]
pub enum GenerateCommand {
    /// City public-transport journeys (Parquet): the demo's `trips` table
    /// (`card_id` is the privacy unit; 60,000 cards, 40 zones, 90 days from
    /// 2026-01-01).
    Trips {
        #[command(flatten)]
        out: OutArgs,
        /// Seed of the generator: decimal or 0x-hex (default: the demo's).
        #[arg(long, value_parser = parse_seed)]
        seed: Option<u64>,
        /// Number of journeys (default: the demo's 1,000,000).
        #[arg(long, value_parser = parse_rows)]
        rows: Option<usize>,
    },
    /// Factory machine telemetry (CSV): the demo's `machine_events` table
    /// (`machine_serial` is the privacy unit; 40 machines per manufacturer).
    MachineEvents {
        #[command(flatten)]
        out: OutArgs,
        /// Seed of the generator: decimal or 0x-hex (default: the demo's).
        #[arg(long, value_parser = parse_seed)]
        seed: Option<u64>,
        /// Number of events (default: the demo's 50,000).
        #[arg(long, value_parser = parse_rows)]
        rows: Option<usize>,
        /// A manufacturer whose machines send the events (repeatable; default:
        /// the demo's Kessler Werke, Nordhavn Motion and Ostrava Precision).
        /// Serials start with its initials, e.g. `KW-2042-0007`.
        #[arg(long = "manufacturer", value_name = "NAME")]
        manufacturers: Vec<String>,
    },
    /// The 40 fare zones (newline-delimited JSON): the demo's public `zones`
    /// table, which `trips` starts and ends in.
    Zones {
        #[command(flatten)]
        out: OutArgs,
    },
}

#[derive(Args)]
pub struct OutArgs {
    /// File to write (its directory is created if needed).
    #[arg(long, short = 'o', value_name = "FILE")]
    out: PathBuf,
    /// Replace the file if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(command: GenerateCommand) -> Result<()> {
    let (what, out, rows, seed) = match &command {
        GenerateCommand::Trips { out, seed, rows } => {
            let seed = seed.unwrap_or(demo::TRIPS_SEED);
            let rows = rows.unwrap_or(demo::TRIPS_ROWS);
            let path = prepare(out)?;
            demo::write_trips(&path, seed, rows)?;
            ("trips", path, rows, Some(seed))
        }
        GenerateCommand::MachineEvents {
            out,
            seed,
            rows,
            manufacturers,
        } => {
            let seed = seed.unwrap_or(demo::MACHINE_EVENTS_SEED);
            let rows = rows.unwrap_or(demo::MACHINE_EVENTS_ROWS);
            let makers: Vec<&str> = if manufacturers.is_empty() {
                demo::MANUFACTURERS.to_vec()
            } else {
                manufacturers.iter().map(String::as_str).collect()
            };
            // Checked before anything is written.
            demo::manufacturer_prefixes(&makers).context("--manufacturer")?;
            let path = prepare(out)?;
            demo::write_machine_events(&path, seed, rows, &makers)?;
            ("machine_events", path, rows, Some(seed))
        }
        GenerateCommand::Zones { out } => {
            let path = prepare(out)?;
            demo::write_zones(&path)?;
            ("zones", path, demo::ZONES_ROWS, None)
        }
    };
    match seed {
        Some(seed) => println!(
            "wrote {rows} rows of {what} to {} (seed {seed})",
            out.display()
        ),
        None => println!("wrote {rows} rows of {what} to {}", out.display()),
    }
    Ok(())
}

/// Refuses to overwrite without `--force` and creates the directory.
fn prepare(out: &OutArgs) -> Result<PathBuf> {
    let path = &out.out;
    if path.as_os_str().is_empty() {
        bail!("--out: give a file name");
    }
    if path.is_dir() {
        bail!("--out {}: is a directory; give a file name", path.display());
    }
    if path.exists() && !out.force {
        bail!(
            "--out {}: the file exists; pass --force to replace it",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--out: creating directory {}", dir.display()))?;
    }
    Ok(path.to_path_buf())
}

/// A `--seed` or `--rows` value that is not one (clap shows the message
/// after "invalid value … for '--seed <SEED>'").
#[derive(Debug, thiserror::Error)]
enum ArgError {
    #[error("`{0}` is not a seed: write a whole number from 0 to {max}, decimal or 0x-hex", max = u64::MAX)]
    Seed(String),
    #[error("`{0}` is not a row count: write a whole number from 1 to {MAX_ROWS}")]
    Rows(String),
}

fn parse_seed(s: &str) -> Result<u64, ArgError> {
    let digits = s.replace('_', "");
    let parsed = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse(),
    };
    parsed.map_err(|_| ArgError::Seed(s.to_string()))
}

fn parse_rows(s: &str) -> Result<usize, ArgError> {
    let bad = || ArgError::Rows(s.to_string());
    let rows: usize = s.replace('_', "").parse().map_err(|_| bad())?;
    if !(1..=MAX_ROWS).contains(&rows) {
        return Err(bad());
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;

    /// Parses `sluice generate …` as the binary does.
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: GenerateCommand,
    }

    fn generate(args: &[&str]) -> Result<()> {
        let cli = Cli::try_parse_from(std::iter::once("generate").chain(args.iter().copied()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        run(cli.command)
    }

    fn bytes(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_file_and_another_seed_another() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| dir.path().join(name);
        let path = |name: &str| file(name).to_str().unwrap().to_string();
        for (kind, ext, extra) in [
            ("trips", "parquet", vec![]),
            (
                "machine-events",
                "csv",
                vec!["--manufacturer", "Kessler Werke"],
            ),
        ] {
            let run = |name: &str, seed: &str| {
                let out = path(&format!("{kind}-{name}.{ext}"));
                let mut args = vec![kind, "--out", &out, "--rows", "3000", "--seed", seed];
                args.extend(extra.iter().copied());
                generate(&args).unwrap();
                bytes(Path::new(&out))
            };
            let (a, b, c) = (run("a", "7"), run("b", "7"), run("c", "0x8"));
            assert_eq!(a, b, "{kind}: same seed, same bytes");
            assert_ne!(a, c, "{kind}: another seed, other bytes");
        }
        // Only the named manufacturer, with its own serials.
        let csv = String::from_utf8(bytes(&file("machine-events-a.csv"))).unwrap();
        assert_eq!(csv.lines().count(), 3001);
        assert!(
            csv.lines()
                .skip(1)
                .all(|l| l.contains(",KW-") && l.contains(",Kessler Werke,")),
            "{}",
            &csv[..500]
        );
    }

    #[test]
    fn defaults_write_the_demo_data() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, demo) = (dir.path().join("ours.csv"), dir.path().join("demo.csv"));
        generate(&["machine-events", "--out", ours.to_str().unwrap()]).unwrap();
        demo::write_machine_events(
            &demo,
            demo::MACHINE_EVENTS_SEED,
            demo::MACHINE_EVENTS_ROWS,
            &demo::MANUFACTURERS,
        )
        .unwrap();
        assert_eq!(bytes(&ours), bytes(&demo));
        let zones = dir.path().join("sub").join("zones.json");
        generate(&["zones", "--out", zones.to_str().unwrap()]).unwrap();
        assert_eq!(
            String::from_utf8(bytes(&zones)).unwrap().lines().count(),
            40
        );
    }

    #[test]
    fn bad_arguments_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("events.csv");
        let out = out.to_str().unwrap();
        let dir_path = dir.path().to_str().unwrap();
        for (args, error) in [
            (
                vec!["trips", "--out", out, "--rows", "0"],
                "not a row count",
            ),
            (
                vec!["trips", "--out", out, "--rows", "ten"],
                "not a row count",
            ),
            (
                vec!["trips", "--out", out, "--rows", "100000001"],
                "from 1 to 100000000",
            ),
            (vec!["trips", "--out", out, "--seed=-1"], "not a seed"),
            (vec!["trips", "--out", out, "--seed", "0xZZ"], "not a seed"),
            (vec!["trips"], "--out"),
            (vec!["zones", "--out", out, "--seed", "1"], "--seed"),
            (
                vec!["trips", "--out", out, "--manufacturer", "X"],
                "--manufacturer",
            ),
            (
                vec!["machine-events", "--out", out, "--manufacturer", "A, B"],
                "not allowed",
            ),
            (
                vec![
                    "machine-events",
                    "--out",
                    out,
                    "--manufacturer",
                    "Kessler Werke",
                    "--manufacturer",
                    "Kappa Works",
                ],
                "share the machine-serial prefix",
            ),
            (vec!["zones", "--out", dir_path], "is a directory"),
        ] {
            let message = format!("{:#}", generate(&args).unwrap_err());
            assert!(message.contains(error), "{args:?}: {message}");
        }
        // Nothing was written by the refused commands.
        assert!(!Path::new(out).exists());
        generate(&["zones", "--out", out]).unwrap();
        let message = format!("{:#}", generate(&["zones", "--out", out]).unwrap_err());
        assert!(message.contains("pass --force"), "{message}");
        generate(&["zones", "--out", out, "--force"]).unwrap();
    }
}
