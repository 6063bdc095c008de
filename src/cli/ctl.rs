//! `ringnbd ctl`: a running server's control socket from the shell.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::control::client;
use crate::control::protocol::{Reply, Verb};

/// The environment variable naming the control socket when --control is
/// not given.
pub const CONTROL_ENV: &str = "RINGNBD_CONTROL";

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The server's control socket (its --control). Default: $RINGNBD_CONTROL.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Print the server's JSON reply instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(subcommand)]
    pub action: CtlAction,
}

#[derive(Debug, Subcommand)]
pub enum CtlAction {
    /// The server, its exports and their change tracking.
    Status,
    /// Checkpoints of an export's change tracking.
    #[command(subcommand)]
    Checkpoint(CheckpointAction),
    /// Point-in-time snapshot exports (EXPORT@NAME).
    #[command(subcommand)]
    Snapshot(SnapshotAction),
    /// Copy the top layer of a layered export into the layer below, while
    /// serving (the top keeps its data; doc/layers.md).
    Commit { export: String },
    /// Requests per export and command: counts, bytes, errors, latency
    /// (doc/metrics.md).
    Stats,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Cut checkpoint NAME and, with it, the read-only export EXPORT@NAME
    /// that reads as EXPORT did at that instant.
    Create { export: String, name: String },
    /// List the snapshots being served (of one export, or all).
    List { export: Option<String> },
    /// Stop serving EXPORT@NAME and remove its clone (checkpoint NAME stays).
    Delete { export: String, name: String },
}

#[derive(Debug, Subcommand)]
pub enum CheckpointAction {
    /// Cut a checkpoint: later writes are "changed since NAME"
    /// (qemu:dirty-bitmap:NAME).
    Create { export: String, name: String },
    /// List an export's checkpoints.
    List { export: String },
    /// Forget a checkpoint.
    Delete { export: String, name: String },
}

impl CtlAction {
    fn verb(&self) -> Verb {
        match self {
            CtlAction::Status => Verb::Status,
            CtlAction::Checkpoint(CheckpointAction::Create { export, name }) => {
                Verb::CheckpointCreate { export: export.clone(), name: name.clone() }
            }
            CtlAction::Checkpoint(CheckpointAction::List { export }) => Verb::CheckpointList { export: export.clone() },
            CtlAction::Checkpoint(CheckpointAction::Delete { export, name }) => {
                Verb::CheckpointDelete { export: export.clone(), name: name.clone() }
            }
            CtlAction::Snapshot(SnapshotAction::Create { export, name }) => {
                Verb::SnapshotCreate { export: export.clone(), name: name.clone() }
            }
            CtlAction::Snapshot(SnapshotAction::List { export }) => Verb::SnapshotList { export: export.clone() },
            CtlAction::Snapshot(SnapshotAction::Delete { export, name }) => {
                Verb::SnapshotDelete { export: export.clone(), name: name.clone() }
            }
            CtlAction::Commit { export } => Verb::LayerCommit { export: export.clone() },
            CtlAction::Stats => Verb::Stats,
        }
    }
}

/// Runs one ctl command: 0 on success, 1 when the server refused it, 2
/// when the server could not be reached.
pub fn run(args: &CtlArgs) -> ExitCode {
    let Some(socket) = args.control.clone().or_else(|| std::env::var_os(CONTROL_ENV).map(PathBuf::from)) else {
        eprintln!("ringnbd ctl: no control socket: give --control PATH or set {CONTROL_ENV}");
        return ExitCode::from(2);
    };
    let reply = match client::call(&socket, args.action.verb()) {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!("ringnbd ctl: {}: {e}", socket.display());
            return ExitCode::from(2);
        }
    };
    if args.json {
        print!("{}", reply.to_line());
        return if reply.ok { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    match reply {
        Reply { ok: true, result: Some(result), .. } => {
            print!("{}", describe(&args.action, &result));
            ExitCode::SUCCESS
        }
        Reply { error: Some(error), .. } => {
            let kind = serde_json::to_value(error.kind).ok().and_then(|k| k.as_str().map(String::from));
            eprintln!("ringnbd ctl: {} ({})", error.message, kind.unwrap_or_default());
            ExitCode::from(1)
        }
        _ => {
            eprintln!("ringnbd ctl: the server's reply had neither a result nor an error");
            ExitCode::from(2)
        }
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The result as lines for people.
fn describe(action: &CtlAction, result: &Value) -> String {
    let mut out = String::new();
    match action {
        CtlAction::Status => {
            out += &format!(
                "ringnbd {}: up {} s, {} worker(s), {} connection(s)\n",
                text(&result["version"]),
                text(&result["uptime_s"]),
                text(&result["workers"]),
                text(&result["connections"])
            );
            for e in result["exports"].as_array().into_iter().flatten() {
                let mode = if e["read_only"] == Value::Bool(true) { "read-only" } else { "read-write" };
                let tracking = match &e["tracking"] {
                    Value::Null => "not tracked".to_owned(),
                    t => format!(
                        "tracked in {} ({} B granules), era {}, {} checkpoint(s), {} invalid",
                        if t["state_file"].is_null() { "memory".into() } else { text(&t["state_file"]) },
                        text(&t["granule_bytes"]),
                        text(&t["current_era"]),
                        text(&t["checkpoints"]),
                        text(&t["invalid_checkpoints"])
                    ),
                };
                out += &format!("export {}: {} bytes, {mode}, {tracking}\n", e["name"], text(&e["size"]));
                if let l @ Value::Object(_) = &e["layers"] {
                    let top =
                        if l["throwaway"] == Value::Bool(true) { "a throwaway top".into() } else { text(&l["top"]) };
                    let lowers: Vec<String> = l["lowers"].as_array().into_iter().flatten().map(text).collect();
                    out += &format!(
                        "  layers: {top} ({} chunk(s) of {} B) over {}\n",
                        text(&l["top_chunks"]),
                        text(&l["chunk_bytes"]),
                        lowers.join(" over ")
                    );
                }
            }
        }
        CtlAction::Checkpoint(CheckpointAction::Create { .. }) => {
            out += &format!(
                "created checkpoint {} on export {} (era {}); changes since it: context {}\n",
                text(&result["name"]),
                text(&result["export"]),
                text(&result["era"]),
                text(&result["contexts"][0])
            );
        }
        CtlAction::Checkpoint(CheckpointAction::List { .. }) => {
            out += &format!("{:<32} {:>6} {:>15} {}\n", "NAME", "ERA", "CREATED (ms)", "STATE");
            for c in result["checkpoints"].as_array().into_iter().flatten() {
                let state = if c["valid"] == Value::Bool(true) { "valid" } else { "INVALID" };
                out += &format!(
                    "{:<32} {:>6} {:>15} {state}\n",
                    text(&c["name"]),
                    text(&c["era"]),
                    text(&c["created_unix_ms"])
                );
            }
        }
        CtlAction::Checkpoint(CheckpointAction::Delete { .. }) => {
            out += &format!("deleted checkpoint {} from export {}\n", text(&result["name"]), text(&result["export"]));
        }
        CtlAction::Snapshot(SnapshotAction::Create { .. }) => {
            out += &format!(
                "created snapshot export {} (checkpoint {}, era {}) from {}\n",
                text(&result["snapshot"]["name"]),
                text(&result["checkpoint"]["name"]),
                text(&result["checkpoint"]["era"]),
                text(&result["snapshot"]["export"])
            );
        }
        CtlAction::Snapshot(SnapshotAction::List { .. }) => {
            out += &format!("{:<40} {:<24} {:>15} {}\n", "EXPORT", "CHECKPOINT", "CREATED (ms)", "CLONE");
            for s in result["snapshots"].as_array().into_iter().flatten() {
                out += &format!(
                    "{:<40} {:<24} {:>15} {}\n",
                    text(&s["name"]),
                    text(&s["checkpoint"]),
                    text(&s["created_unix_ms"]),
                    text(&s["clone"])
                );
            }
        }
        CtlAction::Snapshot(SnapshotAction::Delete { .. }) => {
            out += &format!("deleted snapshot export {}\n", text(&result["name"]));
        }
        CtlAction::Stats => out += &stats_table(result),
        CtlAction::Commit { .. } => {
            out += &format!(
                "committed {} chunk(s) ({} bytes) of export {} into {} in {} ms\n",
                text(&result["chunks"]),
                text(&result["bytes"]),
                text(&result["export"]),
                text(&result["into"]),
                text(&result["elapsed_ms"])
            );
        }
    }
    out
}

/// `ctl stats` for people: a line per export and command, all workers
/// together.
fn stats_table(result: &Value) -> String {
    let mut out = format!(
        "{} worker(s), {} reporting\n{:<24} {:<13} {:>12} {:>16} {:>8} {:>9} {:>9} {:>9}\n",
        text(&result["workers"]),
        text(&result["workers_reporting"]),
        "EXPORT",
        "COMMAND",
        "OPS",
        "BYTES",
        "ERRORS",
        "P50 us",
        "P99 us",
        "MAX us"
    );
    for export in result["exports"].as_array().into_iter().flatten() {
        let name = text(&export["name"]);
        out += &format!(
            "{:<24} {} connection(s) open, {} served, {} request(s) in flight\n",
            name,
            text(&export["connections"]),
            text(&export["connections_total"]),
            text(&export["in_flight"])
        );
        for (command, c) in export["commands"].as_object().into_iter().flatten() {
            let errors: u64 = c["errors"].as_object().into_iter().flatten().filter_map(|(_, n)| n.as_u64()).sum();
            let latency = &c["latency_us"];
            out += &format!(
                "{:<24} {:<13} {:>12} {:>16} {:>8} {:>9} {:>9} {:>9}\n",
                "",
                command,
                text(&c["ops"]),
                text(&c["bytes"]),
                errors,
                text(&latency["p50"]),
                text(&latency["p99"]),
                text(&latency["max"])
            );
        }
    }
    out
}
