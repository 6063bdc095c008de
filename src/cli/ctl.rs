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
    /// Exports added and removed while serving.
    #[command(subcommand)]
    Export(ExportAction),
    /// Apply the config file's exports again (what SIGHUP does): new ones
    /// appear, removed ones stop taking clients, unchanged ones are left
    /// alone (doc/config.md).
    Reload {
        /// Close the connections of removed and changed exports (in-flight
        /// requests are answered first).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExportAction {
    /// Serve a new export. Give exactly one of --path, --memory, --layer
    /// (repeated, highest first) and --throwaway-over; the other options
    /// are a config file's [[export]] keys, which --table gives as JSON.
    Add(Box<ExportAddArgs>),
    /// Stop offering an export; its connections finish first.
    Remove {
        export: String,
        /// Close its connections now (in-flight requests are answered).
        #[arg(long)]
        force: bool,
    },
    /// Every export: where it came from, its state and its connections.
    List,
}

#[derive(Debug, Args)]
pub struct ExportAddArgs {
    /// The export's name (any UTF-8).
    pub name: String,
    #[arg(long, value_name = "FILE")]
    pub path: Option<PathBuf>,
    /// A sparse in-memory export of this size (e.g. 1G).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// A layer of a layered export, highest (the writable top) first.
    #[arg(long = "layer", value_name = "FILE")]
    pub layers: Vec<PathBuf>,
    /// A throwaway top over these read-only layers, highest first.
    #[arg(long = "throwaway-over", value_name = "FILE")]
    pub throwaway: Vec<PathBuf>,
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    #[arg(long)]
    pub read_only: bool,
    /// Buffered I/O instead of O_DIRECT.
    #[arg(long)]
    pub no_direct: bool,
    /// Track changes (checkpoints, dirty bitmaps).
    #[arg(long)]
    pub track: bool,
    /// Checkpoints to create where absent (implies --track).
    #[arg(long = "checkpoint", value_name = "NAME")]
    pub checkpoints: Vec<String>,
    #[arg(long)]
    pub tls_only: bool,
    /// Allow rules of this export (dn:, psk:, addr:, uid:).
    #[arg(long, value_name = "RULE")]
    pub allow: Vec<String>,
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// More keys of the export table, as a JSON object (they win).
    #[arg(long, value_name = "JSON")]
    pub table: Option<String>,
}

impl ExportAddArgs {
    /// The request's export table.
    fn table(&self) -> Result<Value, String> {
        let mut table = serde_json::json!({ "name": self.name });
        let mut set = |key: &str, value: Value| {
            table[key] = value;
        };
        if let Some(path) = &self.path {
            set("path", serde_json::json!(path));
        }
        if let Some(memory) = &self.memory {
            set("memory", serde_json::json!(memory));
        }
        if !self.layers.is_empty() {
            set("layers", serde_json::json!(self.layers));
        }
        if !self.throwaway.is_empty() {
            set("throwaway", serde_json::json!(self.throwaway));
        }
        if let Some(text) = &self.description {
            set("description", serde_json::json!(text));
        }
        for (key, on) in [("read-only", self.read_only), ("track", self.track), ("tls-only", self.tls_only)] {
            if on {
                set(key, Value::Bool(true));
            }
        }
        if self.no_direct {
            set("direct", Value::Bool(false));
        }
        if !self.checkpoints.is_empty() {
            set("checkpoints", serde_json::json!(self.checkpoints));
        }
        if !self.allow.is_empty() {
            set("allow", serde_json::json!(self.allow));
        }
        if let Some(max) = self.max_connections {
            set("max-connections", serde_json::json!(max));
        }
        if let Some(text) = &self.table {
            let Ok(Value::Object(extra)) = serde_json::from_str::<Value>(text) else {
                return Err("--table: not a JSON object".into());
            };
            for (key, value) in extra {
                table[key.as_str()] = value;
            }
        }
        Ok(table)
    }
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
    fn verb(&self) -> Result<Verb, String> {
        Ok(match self {
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
            CtlAction::Export(ExportAction::Add(args)) => Verb::ExportAdd { export: args.table()? },
            CtlAction::Export(ExportAction::Remove { export, force }) => {
                Verb::ExportRemove { export: export.clone(), force: *force }
            }
            CtlAction::Export(ExportAction::List) => Verb::ExportList,
            CtlAction::Reload { force } => Verb::Reload { force: *force },
        })
    }
}

/// Runs one ctl command: 0 on success, 1 when the server refused it, 2
/// when the server could not be reached.
pub fn run(args: &CtlArgs) -> ExitCode {
    let Some(socket) = args.control.clone().or_else(|| std::env::var_os(CONTROL_ENV).map(PathBuf::from)) else {
        eprintln!("ringnbd ctl: no control socket: give --control PATH or set {CONTROL_ENV}");
        return ExitCode::from(2);
    };
    let verb = match args.action.verb() {
        Ok(verb) => verb,
        Err(e) => {
            eprintln!("ringnbd ctl: {e}");
            return ExitCode::from(2);
        }
    };
    let reply = match client::call(&socket, verb) {
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
            // A reload that could not apply every export did not do its job.
            let partial = result["errors"].as_array().is_some_and(|errors| !errors.is_empty());
            if partial { ExitCode::from(1) } else { ExitCode::SUCCESS }
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
        CtlAction::Export(ExportAction::Add(_)) => {
            out += &format!(
                "added export {} ({} bytes, {})\n",
                result["name"],
                text(&result["size"]),
                if result["read_only"] == Value::Bool(true) { "read-only" } else { "read-write" }
            );
        }
        CtlAction::Export(ExportAction::Remove { .. }) => {
            out += &format!(
                "removed export {}; {} connection(s) {}\n",
                result["export"],
                text(&result["connections"]),
                if result["forced"] == Value::Bool(true) { "closing" } else { "finishing" }
            );
        }
        CtlAction::Export(ExportAction::List) => {
            out +=
                &format!("{:<32} {:<13} {:<9} {:>6} {:>16} {}\n", "EXPORT", "ORIGIN", "STATE", "CONNS", "SIZE", "MODE");
            for e in result["exports"].as_array().into_iter().flatten() {
                let mode = if e["read_only"] == Value::Bool(true) { "read-only" } else { "read-write" };
                let connections =
                    if e["state"] == "waiting" { &e["waiting_for_connections"] } else { &e["connections"] };
                out += &format!(
                    "{:<32} {:<13} {:<9} {:>6} {:>16} {}\n",
                    text(&e["name"]),
                    text(&e["origin"]),
                    text(&e["state"]),
                    text(connections),
                    text(&e["size"]),
                    if e["state"] == "waiting" { "-" } else { mode }
                );
            }
        }
        CtlAction::Reload { .. } => {
            for key in ["added", "removed", "changed", "waiting", "unchanged"] {
                let names: Vec<String> = result[key].as_array().into_iter().flatten().map(text).collect();
                if !names.is_empty() {
                    out += &format!("{key}: {}\n", names.join(", "));
                }
            }
            for e in result["errors"].as_array().into_iter().flatten() {
                out += &format!("error: export {}: {}\n", e["export"], text(&e["message"]));
            }
            if out.is_empty() {
                out += "nothing to change\n";
            }
        }
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
