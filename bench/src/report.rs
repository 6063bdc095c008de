//! Final reports: a readable table, or JSON (`--json`), written by hand so
//! the tool needs no serialization crates. Pure: data in, text out.

use std::fmt::Write;

use crate::map::{MapTotals, STATUS_NAMES};
use crate::stats::{OpStats, Stats};
use crate::workload::Workload;
use ringnbd::proto::client::codec::Framing;
use ringnbd::proto::client::handshake::BlockSizes;

const MIB: f64 = (1 << 20) as f64;
/// Latency quantiles reported, with their labels.
const QUANTILES: [(f64, &str); 5] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9"), (0.9999, "p99.99")];

/// What was run against what.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub uri: String,
    pub framing: Framing,
    pub extended_refused: bool,
    pub export_bytes: u64,
    pub block_sizes: BlockSizes,
    pub connections: u32,
    pub iodepth: u32,
    pub threads: u32,
    pub region_offset: u64,
    pub region_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct LoadReport {
    pub info: RunInfo,
    pub workload: Workload,
    pub read_percent: u32,
    pub bs: u64,
    pub rate: Option<f64>,
    pub warmup_seconds: f64,
    pub seed: u64,
    pub verify: bool,
    pub prefill: bool,
    pub stats: Stats,
}

#[derive(Debug, Clone)]
pub struct MapReport {
    pub info: RunInfo,
    pub totals: MapTotals,
    pub seconds: f64,
    pub latency: OpStats,
}

/// Summary numbers for one operation type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpSummary {
    pub ops: u64,
    pub bytes: u64,
    pub iops: f64,
    pub bytes_per_second: f64,
    pub mean_us: f64,
    pub quantiles_us: [f64; 5],
    pub max_us: f64,
}

pub fn summarize(op: &OpStats, seconds: f64) -> OpSummary {
    let per_second = |count: u64| if seconds > 0.0 { count as f64 / seconds } else { 0.0 };
    let us = |ns: u64| ns as f64 / 1000.0;
    let h = &op.latency_ns;
    let empty = h.is_empty();
    OpSummary {
        ops: op.ops,
        bytes: op.bytes,
        iops: per_second(op.ops),
        bytes_per_second: per_second(op.bytes),
        mean_us: if empty { 0.0 } else { h.mean() / 1000.0 },
        quantiles_us: QUANTILES.map(|(q, _)| if empty { 0.0 } else { us(h.value_at_quantile(q)) }),
        max_us: if empty { 0.0 } else { us(h.max()) },
    }
}

fn plural(n: u32, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn framing_text(info: &RunInfo) -> String {
    let refused = if info.extended_refused { " (extended headers refused)" } else { "" };
    format!("{}{refused}", info.framing.name())
}

fn header(out: &mut String, info: &RunInfo, what: &str) {
    let b = info.block_sizes;
    let _ = writeln!(out, "ringnbd-bench {}  {what}", info.uri);
    let _ = writeln!(
        out,
        "  export {} bytes, block sizes {}/{}/{}, {}",
        info.export_bytes,
        b.minimum,
        b.preferred,
        b.maximum,
        framing_text(info)
    );
    let _ = writeln!(
        out,
        "  region {} + {} bytes, {} x iodepth {}, {}",
        info.region_offset,
        info.region_bytes,
        plural(info.connections, "connection"),
        info.iodepth,
        plural(info.threads, "thread")
    );
}

fn latency_row(out: &mut String, label: &str, s: &OpSummary) {
    let _ =
        write!(out, "{label:<6} {:>11} {:>11.1} {:>9.1} {:>9.1}", s.ops, s.iops, s.bytes_per_second / MIB, s.mean_us);
    for q in s.quantiles_us {
        let _ = write!(out, " {q:>9.1}");
    }
    let _ = writeln!(out, " {:>9.1}", s.max_us);
}

fn latency_header(out: &mut String) {
    let _ = write!(out, "{:<6} {:>11} {:>11} {:>9} {:>9}", "op", "ops", "IOPS", "MiB/s", "mean");
    for (_, label) in QUANTILES {
        let _ = write!(out, " {label:>9}");
    }
    let _ = writeln!(out, " {:>9}   (latency in µs)", "max");
}

pub fn load_table(r: &LoadReport) -> String {
    let mut out = String::new();
    let mix = if r.workload == Workload::Randrw { format!(" ({}% reads)", r.read_percent) } else { String::new() };
    header(&mut out, &r.info, &format!("{}{mix}, bs {}", r.workload.name(), r.bs));
    let seconds = r.stats.seconds();
    let pacing = match r.rate {
        Some(rate) => format!("open loop at {rate} IOPS (latency from each request's due time)"),
        None => "closed loop".to_string(),
    };
    let _ =
        writeln!(out, "  {pacing}, {seconds:.2} s measured after {:.2} s warmup, seed {}", r.warmup_seconds, r.seed);
    if r.prefill {
        let _ = writeln!(out, "  region prefilled before measuring");
    }
    let _ = writeln!(out);
    latency_header(&mut out);
    for (label, op) in [("read", &r.stats.read), ("write", &r.stats.write)] {
        if op.ops > 0 || (label == "read" && r.read_percent > 0) || (label == "write" && r.read_percent < 100) {
            latency_row(&mut out, label, &summarize(op, seconds));
        }
    }
    if r.rate.is_some() && r.stats.lag.ops > 0 {
        let lag = summarize(&r.stats.lag, seconds);
        let _ = writeln!(
            out,
            "\n  sent after due time: p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
            lag.quantiles_us[0], lag.quantiles_us[2], lag.quantiles_us[3], lag.max_us
        );
    }
    if r.stats.unsent > 0 {
        let _ = writeln!(
            out,
            "\n  {} requests came due but were never sent: the server fell behind the rate",
            r.stats.unsent
        );
    }
    if r.verify {
        let v = r.stats.verify;
        let verdict = if v.sectors_bad == 0 { "OK" } else { "MISMATCH" };
        let _ = writeln!(
            out,
            "\nverify {verdict}: {} reads checked, {} sectors ok, {} bad in {} reads, {} never written by this run; {} blocks written",
            v.reads_checked, v.sectors_ok, v.sectors_bad, v.reads_bad, v.sectors_unknown, v.blocks_written
        );
    }
    out
}

pub fn map_table(r: &MapReport) -> String {
    let mut out = String::new();
    header(&mut out, &r.info, "map (BLOCK_STATUS base:allocation)");
    let t = &r.totals;
    let rate = |n: u64| if r.seconds > 0.0 { n as f64 / r.seconds } else { 0.0 };
    let _ = writeln!(
        out,
        "\n{} extents ({} descriptors, {} requests) in {:.6} s: {:.0} extents/s, {:.0} descriptors/s",
        t.extents,
        t.descriptors,
        t.requests,
        r.seconds,
        rate(t.extents),
        rate(t.descriptors)
    );
    for (name, bytes) in STATUS_NAMES.iter().zip(t.bytes_by_status) {
        let share = if t.bytes() > 0 { 100.0 * bytes as f64 / t.bytes() as f64 } else { 0.0 };
        let _ = writeln!(out, "  {name:<10} {bytes:>20} bytes  {share:>6.2}%");
    }
    let _ = writeln!(out);
    latency_header(&mut out);
    latency_row(&mut out, "status", &summarize(&r.latency, r.seconds));
    out
}

/// A JSON string literal.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (JSON has no NaN or infinity).
fn json_f64(value: f64) -> String {
    if value.is_finite() { format!("{value:.6}") } else { "null".to_string() }
}

fn json_op(s: &OpSummary) -> String {
    let quantiles: Vec<String> =
        QUANTILES.iter().zip(s.quantiles_us).map(|((_, label), v)| format!("\"{label}\":{}", json_f64(v))).collect();
    format!(
        "{{\"ops\":{},\"bytes\":{},\"iops\":{},\"bytes_per_second\":{},\"latency_us\":{{\"mean\":{},{},\"max\":{}}}}}",
        s.ops,
        s.bytes,
        json_f64(s.iops),
        json_f64(s.bytes_per_second),
        json_f64(s.mean_us),
        quantiles.join(","),
        json_f64(s.max_us)
    )
}

fn json_info(info: &RunInfo) -> String {
    let b = info.block_sizes;
    format!(
        "\"uri\":{},\"framing\":{},\"extended_refused\":{},\"export\":{{\"size\":{},\"block_minimum\":{},\"block_preferred\":{},\"block_maximum\":{}}},\"region\":{{\"offset\":{},\"length\":{}}},\"connections\":{},\"iodepth\":{},\"threads\":{}",
        json_string(&info.uri),
        json_string(info.framing.name()),
        info.extended_refused,
        info.export_bytes,
        b.minimum,
        b.preferred,
        b.maximum,
        info.region_offset,
        info.region_bytes,
        info.connections,
        info.iodepth,
        info.threads
    )
}

pub fn load_json(r: &LoadReport) -> String {
    let seconds = r.stats.seconds();
    let v = r.stats.verify;
    let verify = if r.verify {
        format!(
            "{{\"ok\":{},\"reads_checked\":{},\"sectors_ok\":{},\"sectors_bad\":{},\"reads_bad\":{},\"sectors_unknown\":{},\"blocks_written\":{}}}",
            v.sectors_bad == 0,
            v.reads_checked,
            v.sectors_ok,
            v.sectors_bad,
            v.reads_bad,
            v.sectors_unknown,
            v.blocks_written
        )
    } else {
        "null".to_string()
    };
    format!(
        "{{\"mode\":\"load\",{},\"workload\":{},\"read_percent\":{},\"bs\":{},\"loop\":{},\"rate\":{},\"seconds\":{},\"warmup_seconds\":{},\"seed\":{},\"prefill\":{},\"read\":{},\"write\":{},\"unsent\":{},\"send_lag\":{},\"verify\":{}}}",
        json_info(&r.info),
        json_string(r.workload.name()),
        r.read_percent,
        r.bs,
        json_string(if r.rate.is_some() { "open" } else { "closed" }),
        r.rate.map_or("null".to_string(), json_f64),
        json_f64(seconds),
        json_f64(r.warmup_seconds),
        r.seed,
        r.prefill,
        json_op(&summarize(&r.stats.read, seconds)),
        json_op(&summarize(&r.stats.write, seconds)),
        r.stats.unsent,
        if r.rate.is_some() { json_op(&summarize(&r.stats.lag, seconds)) } else { "null".to_string() },
        verify
    )
}

pub fn map_json(r: &MapReport) -> String {
    let t = &r.totals;
    let rate = |n: u64| if r.seconds > 0.0 { n as f64 / r.seconds } else { 0.0 };
    let bytes: Vec<String> =
        STATUS_NAMES.iter().zip(t.bytes_by_status).map(|(name, b)| format!("{}:{b}", json_string(name))).collect();
    format!(
        "{{\"mode\":\"map\",{},\"seconds\":{},\"extents\":{},\"descriptors\":{},\"requests\":{},\"extents_per_second\":{},\"descriptors_per_second\":{},\"bytes\":{{{}}},\"status\":{}}}",
        json_info(&r.info),
        json_f64(r.seconds),
        t.extents,
        t.descriptors,
        t.requests,
        json_f64(rate(t.extents)),
        json_f64(rate(t.descriptors)),
        bytes.join(","),
        json_op(&summarize(&r.latency, r.seconds))
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            uri: "nbd://127.0.0.1:10809/".into(),
            framing: Framing::Extended,
            extended_refused: false,
            export_bytes: 1 << 30,
            block_sizes: BlockSizes::default(),
            connections: 2,
            iodepth: 8,
            threads: 1,
            region_offset: 0,
            region_bytes: 1 << 30,
        }
    }

    fn load_report() -> LoadReport {
        let t0 = Instant::now();
        let mut stats = Stats { window: Some((t0, t0 + Duration::from_secs(2))), ..Default::default() };
        for i in 1..=1000 {
            stats.read.record(i * 1000, 4096);
        }
        LoadReport {
            info: info(),
            workload: Workload::Randread,
            read_percent: 100,
            bs: 4096,
            rate: None,
            warmup_seconds: 0.0,
            seed: 1,
            verify: true,
            prefill: true,
            stats,
        }
    }

    #[test]
    fn summaries_use_the_measured_window() {
        let r = load_report();
        let s = summarize(&r.stats.read, r.stats.seconds());
        assert_eq!(s.ops, 1000);
        assert_eq!(s.iops, 500.0);
        assert_eq!(s.bytes_per_second, 2048.0 * 1000.0);
        assert!((499.0..=501.0).contains(&s.quantiles_us[0]), "p50 {}", s.quantiles_us[0]);
        assert!(s.max_us >= 999.0);
        let empty = summarize(&OpStats::new(), 0.0);
        assert_eq!((empty.iops, empty.max_us), (0.0, 0.0));
    }

    #[test]
    fn table_lists_read_and_verify() {
        let text = load_table(&load_report());
        assert!(text.contains("randread, bs 4096"), "{text}");
        assert!(text.contains("p99.99"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("read ") && l.contains("1000")), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("write")), "no write row for randread: {text}");
        assert!(text.contains("verify OK"), "{text}");
    }

    #[test]
    fn json_is_well_formed_enough() {
        let text = load_json(&load_report());
        assert!(text.starts_with('{') && text.ends_with('}'));
        assert_eq!(text.matches('{').count(), text.matches('}').count());
        assert!(text.contains("\"read\":{\"ops\":1000,"), "{text}");
        assert!(text.contains("\"p99.9\":"), "{text}");
        assert!(text.contains("\"verify\":{\"ok\":true"), "{text}");
        assert!(text.contains("\"rate\":null"), "{text}");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }

    #[test]
    fn map_outputs() {
        let totals = MapTotals { extents: 3, descriptors: 4, requests: 2, bytes_by_status: [100, 0, 0, 300] };
        let r = MapReport { info: info(), totals, seconds: 0.5, latency: OpStats::new() };
        let table = map_table(&r);
        assert!(table.contains("3 extents (4 descriptors, 2 requests)"), "{table}");
        assert!(table.contains("6 extents/s"), "{table}");
        assert!(table.contains("hole+zero"), "{table}");
        let json = map_json(&r);
        assert!(json.contains("\"extents\":3,\"descriptors\":4,\"requests\":2"), "{json}");
        assert!(json.contains("\"bytes\":{\"data\":100,\"hole\":0,\"zero\":0,\"hole+zero\":300}"), "{json}");
    }
}
