//! ringnbd-bench: an NBD load generator on io_uring.
//!
//! Layout, pure modules first (no sockets, rings or clocks):
//! - `uri`, `cli`: what to run; the NBD client protocol (negotiation,
//!   request encoding, the reply parser) is the server crate's
//!   `ringnbd::proto::client`; `workload`, `pattern`, `verify`: what to send
//!   and how to check it; `stats`, `report`, `progress`: measuring and printing.
//!
//! Then the I/O: `connect` (blocking negotiation), `engine` + `conn`
//! (one io_uring per worker thread; `user_data` and `send_batch` are its
//! tested pieces), the jobs it runs (`load`, `map`, via `job`), and `run`,
//! which wires threads together.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

mod cli;
mod conn;
mod connect;
mod engine;
mod job;
mod load;
mod map;
mod pattern;
mod progress;
mod report;
mod run;
mod send_batch;
mod stats;
mod tls;
mod uri;
mod user_data;
mod verify;
mod workload;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;

/// Exit statuses (also in `--help`).
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_MISMATCH: u8 = 3;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let clock_seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let plan = match args.validate(cpus, clock_seed) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("ringnbd-bench: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run::run(&plan) {
        Ok(run::Outcome::Load(report)) => {
            let text = if plan.json { report::load_json(&report) } else { report::load_table(&report) };
            println!("{}", text.trim_end());
            if report.stats.verify.sectors_bad > 0 {
                eprintln!("ringnbd-bench: verify found {} mismatched sectors", report.stats.verify.sectors_bad);
                return ExitCode::from(EXIT_MISMATCH);
            }
            ExitCode::SUCCESS
        }
        Ok(run::Outcome::Map(report)) => {
            let text = if plan.json { report::map_json(&report) } else { report::map_table(&report) };
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringnbd-bench: error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
