//! Per-worker request counters: plain integers and histograms owned by the
//! worker thread, never shared, so counting costs a few additions per
//! request and no atomic operation or lock. Readers (the Prometheus
//! endpoint, `ringnbd ctl stats`) ask each worker for a copy through its
//! message channel and merge the copies (`server::stats`).
//!
//! What is counted, per export and command, when a request's reply is
//! ready (the one place every request passes, failed or not):
//! - operations;
//! - bytes, of requests that succeeded: the range the command covers (READ
//!   and WRITE payloads, the range of TRIM, WRITE_ZEROES, CACHE and
//!   BLOCK_STATUS; 0 for FLUSH);
//! - errors, by NBD error code;
//! - latency from the request's header to its reply ready to send, in
//!   microseconds: from the ring turn that received the header (the
//!   worker reads the clock once per turn) to a clock read when the reply
//!   is ready (one vDSO call per request; bench/metrics-overhead finds
//!   counting on and off within noise, doc/benchmarks.md).

use std::collections::HashMap;
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::proto::error::NbdError;
use crate::proto::transmission::Command;
use crate::proto::wire;

/// The commands counted, in the order they are reported.
pub const COMMANDS: [&str; 7] = ["read", "write", "flush", "trim", "write_zeroes", "cache", "block_status"];

/// The NBD errors counted, in the order they are reported.
pub const ERRORS: [NbdError; 8] = [
    NbdError::Perm,
    NbdError::Io,
    NbdError::NoMem,
    NbdError::Inval,
    NbdError::NoSpc,
    NbdError::Overflow,
    NbdError::NotSup,
    NbdError::Shutdown,
];

/// Latencies above this many microseconds (an hour) count as this.
const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Two significant digits: 1% resolution, 26 KiB per histogram (3,328
/// counts up to an hour).
const LATENCY_DIGITS: u8 = 2;

/// Which of [`COMMANDS`] a request on the wire is (its NBD command type):
/// a refused request is counted as what the client sent.
pub fn command_index(kind: u16) -> Option<usize> {
    match kind {
        wire::CMD_READ => Some(0),
        wire::CMD_WRITE => Some(1),
        wire::CMD_FLUSH => Some(2),
        wire::CMD_TRIM => Some(3),
        wire::CMD_WRITE_ZEROES => Some(4),
        wire::CMD_CACHE => Some(5),
        wire::CMD_BLOCK_STATUS => Some(6),
        _ => None,
    }
}

/// The bytes a command covers (see the module comment).
pub fn covered_bytes(command: &Command) -> u64 {
    match *command {
        Command::Read { length, .. } | Command::Write { length, .. } => u64::from(length),
        Command::Trim { length, .. }
        | Command::WriteZeroes { length, .. }
        | Command::Cache { length, .. }
        | Command::BlockStatus { length, .. } => length,
        Command::Flush | Command::Disconnect => 0,
    }
}

#[derive(Clone, Default)]
pub struct CommandCounters {
    pub ops: u64,
    pub bytes: u64,
    /// Parallel to [`ERRORS`].
    pub errors: [u64; ERRORS.len()],
    /// Made at the first request of this command, so an idle server keeps
    /// none.
    pub latency_us: Option<Box<Histogram<u64>>>,
}

impl CommandCounters {
    fn record(&mut self, bytes: u64, error: Option<NbdError>, latency_us: u64) {
        self.ops += 1;
        if error.is_none() {
            self.bytes += bytes;
        }
        if let Some(error) = error
            && let Some(at) = ERRORS.iter().position(|&e| e == error)
        {
            self.errors[at] += 1;
        }
        let histogram = self.latency_us.get_or_insert_with(|| {
            Box::new(Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_DIGITS).expect("valid histogram bounds"))
        });
        histogram.saturating_record(latency_us.clamp(1, LATENCY_US_MAX));
    }

    /// Adds `other` into these counters.
    pub fn merge(&mut self, other: &CommandCounters) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
        if let Some(theirs) = &other.latency_us {
            match &mut self.latency_us {
                Some(mine) => mine.add(&**theirs).expect("histograms of the same bounds"),
                None => self.latency_us = Some(theirs.clone()),
            }
        }
    }
}

/// One export's counters on one worker.
#[derive(Clone, Default)]
pub struct ExportCounters {
    /// Parallel to [`COMMANDS`].
    pub commands: [CommandCounters; COMMANDS.len()],
    /// Connections this worker has served on the export, closed or not.
    pub connections_total: u64,
}

impl ExportCounters {
    pub fn merge(&mut self, other: &ExportCounters) {
        for (mine, theirs) in self.commands.iter_mut().zip(&other.commands) {
            mine.merge(theirs);
        }
        self.connections_total += other.connections_total;
    }
}

/// A worker's counters, by export slot (see [`WorkerCounters::slot`]).
#[derive(Default)]
pub struct WorkerCounters {
    names: Vec<String>,
    by_name: HashMap<String, usize>,
    exports: Vec<ExportCounters>,
}

impl WorkerCounters {
    /// The slot of export `name`, made at its first connection on this
    /// worker (exports appear while serving: snapshots).
    pub fn slot(&mut self, name: &str) -> usize {
        if let Some(&slot) = self.by_name.get(name) {
            return slot;
        }
        let slot = self.exports.len();
        self.names.push(name.to_owned());
        self.by_name.insert(name.to_owned(), slot);
        self.exports.push(ExportCounters::default());
        slot
    }

    pub fn connection_opened(&mut self, slot: usize) {
        self.exports[slot].connections_total += 1;
    }

    /// A request of wire type `kind` on export `slot` has its reply ready.
    pub fn request_done(
        &mut self,
        slot: usize,
        kind: u16,
        bytes: u64,
        error: Option<NbdError>,
        since: Instant,
        now: Instant,
    ) {
        let Some(command) = command_index(kind) else { return };
        let latency_us = now.saturating_duration_since(since).as_micros() as u64;
        self.exports[slot].commands[command].record(bytes, error, latency_us);
    }

    /// A copy for a reader, with the live figures the worker adds: open
    /// connections and requests in flight per slot.
    pub fn snapshot(&self, worker: usize, live: &[(usize, u64, u64)]) -> WorkerSnapshot {
        let mut exports: Vec<ExportSnapshot> = self
            .names
            .iter()
            .zip(&self.exports)
            .map(|(name, counters)| ExportSnapshot {
                name: name.clone(),
                counters: counters.clone(),
                connections: 0,
                in_flight: 0,
            })
            .collect();
        for &(slot, connections, in_flight) in live {
            exports[slot].connections += connections;
            exports[slot].in_flight += in_flight;
        }
        WorkerSnapshot { worker, exports }
    }
}

/// What a worker reports when asked.
#[derive(Clone)]
pub struct WorkerSnapshot {
    pub worker: usize,
    pub exports: Vec<ExportSnapshot>,
}

#[derive(Clone)]
pub struct ExportSnapshot {
    pub name: String,
    pub counters: ExportCounters,
    /// Open now.
    pub connections: u64,
    /// Requests between header and reply sent, now.
    pub in_flight: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn requests_count_by_export_and_command_and_merge() {
        let mut counters = WorkerCounters::default();
        let disk = counters.slot("disk");
        assert_eq!(counters.slot("disk"), disk, "a name keeps its slot");
        let other = counters.slot("other");
        let t0 = Instant::now();
        counters.connection_opened(disk);
        counters.request_done(disk, wire::CMD_READ, 4096, None, t0, t0 + Duration::from_micros(250));
        counters.request_done(disk, wire::CMD_READ, 4096, Some(NbdError::Io), t0, t0 + Duration::from_millis(2));
        counters.request_done(other, wire::CMD_FLUSH, 0, None, t0, t0);
        counters.request_done(disk, wire::CMD_DISC, 0, None, t0, t0);
        let snapshot = counters.snapshot(3, &[(disk, 1, 2)]);
        assert_eq!(snapshot.worker, 3);
        let read = &snapshot.exports[disk].counters.commands[0];
        assert_eq!((read.ops, read.bytes, read.errors[1]), (2, 4096, 1), "a failed read moved no bytes");
        let latency = read.latency_us.as_ref().unwrap();
        assert_eq!(latency.len(), 2);
        assert!((245..=255).contains(&latency.value_at_quantile(0.25)), "{}", latency.value_at_quantile(0.25));
        assert!(latency.max() >= 1990);
        assert_eq!((snapshot.exports[disk].connections, snapshot.exports[disk].in_flight), (1, 2));
        assert_eq!(snapshot.exports[other].counters.commands[2].ops, 1, "a zero latency still counts");
        assert!(snapshot.exports[disk].counters.commands.iter().skip(1).all(|c| c.ops == 0), "DISC is not counted");
        let mut merged = snapshot.exports[disk].counters.clone();
        merged.merge(&snapshot.exports[disk].counters);
        assert_eq!((merged.commands[0].ops, merged.commands[0].latency_us.as_ref().unwrap().len()), (4, 4));
        assert_eq!(merged.commands[0].bytes, 8192);
        assert_eq!(merged.connections_total, 2);
    }

    #[test]
    fn every_counted_command_has_a_wire_type_and_a_range() {
        let kinds = [
            wire::CMD_READ,
            wire::CMD_WRITE,
            wire::CMD_FLUSH,
            wire::CMD_TRIM,
            wire::CMD_WRITE_ZEROES,
            wire::CMD_CACHE,
            wire::CMD_BLOCK_STATUS,
        ];
        let indexes: Vec<usize> = kinds.iter().map(|&k| command_index(k).unwrap()).collect();
        assert_eq!(indexes, (0..COMMANDS.len()).collect::<Vec<_>>());
        assert_eq!(covered_bytes(&Command::Write { offset: 0, length: 512, fua: false }), 512);
        assert_eq!(covered_bytes(&Command::Trim { offset: 0, length: 1 << 40, fua: false }), 1 << 40);
        assert_eq!(covered_bytes(&Command::Flush), 0);
    }
}
