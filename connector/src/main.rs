//! The `sluice` binary: the command line (`cli/`) over the `sluice`
//! library. `main` only parses and runs; each subcommand builds what it
//! needs, and `serve` builds the whole daemon before it listens.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
