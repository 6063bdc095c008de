//! Request statistics as readers see them: the workers' counters merged
//! (per export, and per export and worker), rendered as Prometheus text
//! for `--metrics` and as JSON for `ringnbd ctl stats` (doc/metrics.md).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{Value, json};

use crate::engine::metrics::{COMMANDS, CommandCounters, ERRORS, ExportCounters, ExportSnapshot, WorkerSnapshot};

/// Latency buckets of the Prometheus histogram, in seconds.
const BUCKETS_S: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A figure of one export on one worker.
type PerExport = fn(&ExportSnapshot) -> u64;

/// One export's figures, over every worker.
#[derive(Default)]
struct ExportTotals {
    counters: ExportCounters,
    connections: u64,
    in_flight: u64,
}

pub(super) struct Stats {
    workers: usize,
    snapshots: Vec<WorkerSnapshot>,
    /// By export name, in name order.
    totals: BTreeMap<String, ExportTotals>,
}

impl Stats {
    /// `workers`: how many there are (a worker that did not answer has no
    /// snapshot).
    pub(super) fn new(workers: usize, mut snapshots: Vec<WorkerSnapshot>) -> Self {
        snapshots.sort_by_key(|s| s.worker);
        let mut totals: BTreeMap<String, ExportTotals> = BTreeMap::new();
        for snapshot in &snapshots {
            for export in &snapshot.exports {
                let total = totals.entry(export.name.clone()).or_default();
                total.counters.merge(&export.counters);
                total.connections += export.connections;
                total.in_flight += export.in_flight;
            }
        }
        Stats { workers, snapshots, totals }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub(super) fn prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(&mut out, "ringnbd_workers", "gauge", "Worker threads (one io_uring each).");
        let _ = writeln!(out, "ringnbd_workers {}", self.workers);
        family(&mut out, "ringnbd_workers_reporting", "gauge", "Workers that answered this scrape.");
        let _ = writeln!(out, "ringnbd_workers_reporting {}", self.snapshots.len());

        let gauges: [(&str, &str, &str, PerExport); 3] = [
            ("ringnbd_connections", "gauge", "Transmission connections open.", |e| e.connections),
            ("ringnbd_connections_total", "counter", "Transmission connections served.", |e| {
                e.counters.connections_total
            }),
            ("ringnbd_requests_in_flight", "gauge", "Requests between their header and their reply sent.", |e| {
                e.in_flight
            }),
        ];
        for (name, kind, help, value) in gauges {
            family(&mut out, name, kind, help);
            for snapshot in &self.snapshots {
                for export in &snapshot.exports {
                    let (export_name, worker) = (escape(&export.name), snapshot.worker);
                    let _ = writeln!(out, "{name}{{export=\"{export_name}\",worker=\"{worker}\"}} {}", value(export));
                }
            }
        }

        let per_command = |out: &mut String, metric: &str, value: fn(&CommandCounters) -> u64| {
            for snapshot in &self.snapshots {
                for export in &snapshot.exports {
                    for (command, counters) in COMMANDS.iter().zip(&export.counters.commands) {
                        if counters.ops == 0 {
                            continue;
                        }
                        let _ = writeln!(
                            out,
                            "{metric}{{export=\"{}\",worker=\"{}\",command=\"{command}\"}} {}",
                            escape(&export.name),
                            snapshot.worker,
                            value(counters)
                        );
                    }
                }
            }
        };
        family(&mut out, "ringnbd_requests_total", "counter", "Requests answered, by command.");
        per_command(&mut out, "ringnbd_requests_total", |c| c.ops);
        family(
            &mut out,
            "ringnbd_request_bytes_total",
            "counter",
            "Bytes covered by requests that succeeded (READ/WRITE payloads; the range of TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS).",
        );
        per_command(&mut out, "ringnbd_request_bytes_total", |c| c.bytes);
        family(&mut out, "ringnbd_request_errors_total", "counter", "Requests answered with an error, by NBD error.");
        for snapshot in &self.snapshots {
            for export in &snapshot.exports {
                for (command, counters) in COMMANDS.iter().zip(&export.counters.commands) {
                    for (error, &count) in ERRORS.iter().zip(&counters.errors) {
                        if count > 0 {
                            let _ = writeln!(
                                out,
                                "ringnbd_request_errors_total{{export=\"{}\",worker=\"{}\",command=\"{command}\",error=\"{}\"}} {count}",
                                escape(&export.name),
                                snapshot.worker,
                                error.name()
                            );
                        }
                    }
                }
            }
        }

        family(
            &mut out,
            "ringnbd_request_latency_seconds",
            "histogram",
            "Time from a request's header to its reply ready, by export and command (all workers).",
        );
        for (name, total) in &self.totals {
            for (command, counters) in COMMANDS.iter().zip(&total.counters.commands) {
                let Some(histogram) = counters.latency_us.as_deref() else { continue };
                let labels = format!("export=\"{}\",command=\"{command}\"", escape(name));
                for le in BUCKETS_S {
                    let below = histogram.count_between(0, (le * 1e6) as u64);
                    let _ = writeln!(out, "ringnbd_request_latency_seconds_bucket{{{labels},le=\"{le}\"}} {below}");
                }
                let count = histogram.len();
                let _ = writeln!(out, "ringnbd_request_latency_seconds_bucket{{{labels},le=\"+Inf\"}} {count}");
                let sum = histogram.mean() * count as f64 / 1e6;
                let _ = writeln!(out, "ringnbd_request_latency_seconds_sum{{{labels}}} {sum}");
                let _ = writeln!(out, "ringnbd_request_latency_seconds_count{{{labels}}} {count}");
            }
        }
        out
    }

    /// `ctl stats`: per export (all workers) with latency quantiles, and
    /// per worker.
    pub(super) fn json(&self) -> Value {
        let exports: Vec<Value> = self
            .totals
            .iter()
            .map(|(name, total)| {
                json!({
                    "name": name,
                    "connections": total.connections,
                    "connections_total": total.counters.connections_total,
                    "in_flight": total.in_flight,
                    "commands": commands_json(&total.counters, true),
                })
            })
            .collect();
        let workers: Vec<Value> = self
            .snapshots
            .iter()
            .map(|snapshot| {
                let exports: Vec<Value> = snapshot
                    .exports
                    .iter()
                    .map(|e| {
                        json!({
                            "name": e.name,
                            "connections": e.connections,
                            "connections_total": e.counters.connections_total,
                            "in_flight": e.in_flight,
                            "commands": commands_json(&e.counters, false),
                        })
                    })
                    .collect();
                json!({ "worker": snapshot.worker, "exports": exports })
            })
            .collect();
        json!({ "workers": self.workers, "workers_reporting": self.snapshots.len(), "exports": exports, "per_worker": workers })
    }
}

/// The commands with requests, each with its counts (and, with
/// `latency`, its quantiles in microseconds).
fn commands_json(counters: &ExportCounters, latency: bool) -> Value {
    let mut commands = serde_json::Map::new();
    for (command, c) in COMMANDS.iter().zip(&counters.commands) {
        if c.ops == 0 {
            continue;
        }
        let errors: serde_json::Map<String, Value> = ERRORS
            .iter()
            .zip(&c.errors)
            .filter(|&(_, &n)| n > 0)
            .map(|(error, &n)| (error.name().to_string(), json!(n)))
            .collect();
        let mut entry = json!({ "ops": c.ops, "bytes": c.bytes, "errors": errors });
        if latency && let Some(h) = c.latency_us.as_deref() {
            entry["latency_us"] = json!({
                "p50": h.value_at_quantile(0.5),
                "p90": h.value_at_quantile(0.9),
                "p99": h.value_at_quantile(0.99),
                "p999": h.value_at_quantile(0.999),
                "max": h.max(),
                "mean": (h.mean() * 10.0).round() / 10.0,
            });
        }
        commands.insert(command.to_string(), entry);
    }
    Value::Object(commands)
}

/// A label value as the exposition format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::metrics::WorkerCounters;
    use crate::proto::error::NbdError;
    use crate::proto::wire;
    use std::time::{Duration, Instant};

    fn worker(index: usize, reads: u64, with_error: bool) -> WorkerSnapshot {
        let mut counters = WorkerCounters::default();
        let slot = counters.slot("vm\"1");
        counters.connection_opened(slot);
        let t0 = Instant::now();
        for _ in 0..reads {
            counters.request_done(slot, wire::CMD_READ, 4096, None, t0, t0 + Duration::from_micros(80));
        }
        if with_error {
            counters.request_done(slot, wire::CMD_WRITE, 512, Some(NbdError::Perm), t0, t0 + Duration::from_millis(3));
        }
        counters.snapshot(index, &[(slot, 1, 0)])
    }

    #[test]
    fn prometheus_text_has_every_family_and_exact_counts() {
        let stats = Stats::new(2, vec![worker(1, 3, true), worker(0, 2, false)]);
        let text = stats.prometheus();
        for line in [
            "ringnbd_workers 2",
            r#"ringnbd_connections{export="vm\"1",worker="0"} 1"#,
            r#"ringnbd_requests_total{export="vm\"1",worker="0",command="read"} 2"#,
            r#"ringnbd_requests_total{export="vm\"1",worker="1",command="read"} 3"#,
            r#"ringnbd_request_bytes_total{export="vm\"1",worker="1",command="read"} 12288"#,
            r#"ringnbd_request_errors_total{export="vm\"1",worker="1",command="write",error="EPERM"} 1"#,
            r#"ringnbd_request_latency_seconds_bucket{export="vm\"1",command="read",le="0.0001"} 5"#,
            r#"ringnbd_request_latency_seconds_bucket{export="vm\"1",command="read",le="0.00005"} 0"#,
            r#"ringnbd_request_latency_seconds_count{export="vm\"1",command="write"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(text.find("worker=\"0\"").unwrap() < text.find("worker=\"1\"").unwrap(), "workers in order");
        assert!(!text.contains("command=\"flush\""), "commands without requests are left out");
        // Every sample line belongs to a declared family.
        let families: Vec<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap()).collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            assert!(families.contains(&name) || families.contains(&base), "{line}");
        }
    }

    #[test]
    fn json_totals_merge_workers_and_give_quantiles() {
        let stats = Stats::new(2, vec![worker(0, 2, false), worker(1, 3, true)]);
        let v = stats.json();
        let export = &v["exports"][0];
        assert_eq!(export["name"], "vm\"1");
        assert_eq!(export["connections"], 2);
        assert_eq!(export["commands"]["read"]["ops"], 5);
        assert_eq!(export["commands"]["read"]["bytes"], 5 * 4096);
        assert_eq!(export["commands"]["write"]["errors"]["EPERM"], 1);
        assert!((79..=81).contains(&export["commands"]["read"]["latency_us"]["p50"].as_u64().unwrap()));
        assert_eq!(v["per_worker"][1]["exports"][0]["commands"]["read"]["ops"], 3);
        assert!(v["per_worker"][1]["exports"][0]["commands"]["read"].get("latency_us").is_none());
    }
}
