//! Command line: clap definitions, value parsers (sizes, durations, CPU
//! lists) and validation into a [`Plan`], with every limit named here.

use std::time::Duration;

use clap::{Parser, ValueEnum};
use thiserror::Error;

use crate::uri::{self, NbdUri};
use crate::workload::Workload;
use ringnbd::proto::client::codec::Framing;

/// Connections per run; each holds `iodepth` buffers of `bs` bytes.
pub const CONNECTIONS_MAX: u32 = 1024;
/// Requests in flight per connection. One send batch carries at most this
/// many iovecs, and IOV_MAX (1024) bounds a sendmsg.
pub const IODEPTH_MAX: u32 = 1024;
/// The largest request the spec lets a portable client assume (32 MiB);
/// the server's advertised maximum is checked after negotiation.
pub const BS_MAX: u64 = 32 << 20;
/// All request buffers together (connections x iodepth x bs).
pub const BUFFER_BYTES_MAX: u64 = 16 << 30;
/// When neither --runtime nor --ops is given.
pub const RUNTIME_DEFAULT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HeadersArg {
    /// Try extended headers, then structured replies, then simple replies.
    Extended,
    /// Try structured replies, then simple replies.
    Structured,
    /// Simple replies only (no block status).
    Simple,
}

/// NBD load generator on io_uring: closed- or open-loop read/write
/// workloads with HDR latency histograms, data verification, and
/// whole-export block-status mapping.
///
/// Exit status: 0 success, 1 error (connection, protocol, server error),
/// 2 usage, 3 --verify found mismatched data.
#[derive(Debug, Parser)]
#[command(name = "ringnbd-bench", version, max_term_width = 100)]
pub struct Args {
    /// nbd://HOST[:PORT]/[EXPORT] or nbd+unix:///[EXPORT]?socket=PATH; nbds:// and
    /// nbds+unix:// for TLS (?tls-certificates=DIR, else $HOME/.pki/libnbd)
    pub uri: String,

    /// Workload.
    #[arg(long, value_enum, default_value_t = Workload::Randread)]
    pub rw: Workload,
    /// Percentage of reads for randrw.
    #[arg(long, value_name = "PCT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub rwmix_read: u32,
    /// Request size (suffixes K, M, G: powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Start of the region to use.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Length of the region [default: to the end of the export].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// NBD connections.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub connections: u32,
    /// Requests in flight per connection.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub iodepth: u32,
    /// Worker threads, each with its own io_uring [default: min(connections, CPUs)].
    #[arg(long, value_name = "N")]
    pub threads: Option<u32>,
    /// CPUs to pin workers to, in order, e.g. 4-7,12 [default: all, last first].
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuList>,
    /// Do not pin worker threads.
    #[arg(long)]
    pub no_pin: bool,

    /// Measured run time (e.g. 10, 2.5, 500ms, 1m) [default: 10 unless --ops].
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub runtime: Option<Duration>,
    /// Stop after this many measured requests (in total).
    #[arg(long, value_name = "N")]
    pub ops: Option<u64>,
    /// Run this long before measuring; excluded from the statistics.
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = parse_seconds)]
    pub warmup: Duration,
    /// Open loop: send this many requests per second in total, on schedule,
    /// and measure latency from when each request was due.
    #[arg(long, value_name = "IOPS")]
    pub rate: Option<f64>,

    /// Stamp every written sector and check every read; exit 3 on mismatch.
    #[arg(long)]
    pub verify: bool,
    /// Write the whole region once before measuring (implied by --verify
    /// with a read-only workload).
    #[arg(long)]
    pub prefill: bool,
    /// Seed for offsets and verify stamps [default: from the clock].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Map the region with BLOCK_STATUS base:allocation instead of a workload.
    #[arg(long)]
    pub map: bool,
    /// Bytes per BLOCK_STATUS request [default: region / (connections x iodepth),
    /// capped below 4 GiB without extended headers].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub map_chunk: Option<u64>,

    /// Richest header format to negotiate.
    #[arg(long, value_enum, default_value_t = HeadersArg::Extended)]
    pub headers: HeadersArg,
    /// Fail if a request gets no reply within this time.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_seconds)]
    pub timeout: Duration,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// A validated run description.
#[derive(Debug, Clone)]
pub struct Plan {
    pub uri: NbdUri,
    pub connections: u32,
    pub iodepth: u32,
    pub threads: u32,
    /// CPUs to pin to, in order; `None` = no pinning.
    pub pin: Option<Vec<usize>>,
    pub framing_max: Framing,
    pub timeout: Duration,
    pub json: bool,
    pub quiet: bool,
    /// First byte of the region.
    pub offset: u64,
    /// Region length; `None` = to the end of the export.
    pub size: Option<u64>,
    pub mode: Mode,
}

#[derive(Debug, Clone)]
pub enum Mode {
    Load(LoadPlan),
    Map(MapPlan),
}

#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub workload: Workload,
    pub read_percent: u32,
    pub bs: u64,
    /// Measured time limit (`None` with `ops` set: until the ops are done).
    pub runtime: Option<Duration>,
    pub ops: Option<u64>,
    pub warmup: Duration,
    /// Open-loop total rate; `None` = closed loop.
    pub rate: Option<f64>,
    pub verify: bool,
    pub prefill: bool,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct MapPlan {
    pub chunk: Option<u64>,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(text: impl Into<String>) -> UsageError {
    UsageError(text.into())
}

/// `4096`, `4k`, `4K`, `4KiB`, `1M`, `2g`, `1T` (binary multiples): the
/// server's own size syntax.
pub fn parse_size(text: &str) -> Result<u64, String> {
    ringnbd::cli::export_spec::parse_size(text).map_err(|e| e.to_string())
}

/// `10`, `2.5`, `500ms`, `3s`, `1m`.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let (number, scale) = if let Some(ms) = trimmed.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = trimmed.strip_suffix('s') {
        (s, 1.0)
    } else if let Some(m) = trimmed.strip_suffix('m') {
        (m, 60.0)
    } else {
        (trimmed, 1.0)
    };
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 10, 2.5, 500ms)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("{text:?} is too long"))
}

/// `0-3,8,10-11`.
pub fn parse_cpu_list(text: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let bad = || format!("{part:?} in {text:?} is not a CPU or a range like 4-7");
        let (low, high) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
            None => {
                let cpu: usize = part.trim().parse().map_err(|_| bad())?;
                (cpu, cpu)
            }
        };
        if low > high || high >= 4096 {
            return Err(bad());
        }
        cpus.extend(low..=high);
    }
    Ok(CpuList(cpus))
}

impl Args {
    /// Checks the arguments against each other and against the limits.
    /// `cpus_available` is the number of CPUs this process may run on.
    pub fn validate(self, cpus_available: usize, clock_seed: u64) -> Result<Plan, UsageError> {
        let uri = uri::parse(&self.uri).map_err(|e| usage(e.to_string()))?;
        if !(1..=CONNECTIONS_MAX).contains(&self.connections) {
            return Err(usage(format!("--connections must be 1..={CONNECTIONS_MAX}")));
        }
        if !(1..=IODEPTH_MAX).contains(&self.iodepth) {
            return Err(usage(format!("--iodepth must be 1..={IODEPTH_MAX}")));
        }
        let threads = self.threads.unwrap_or_else(|| self.connections.min(cpus_available.max(1) as u32));
        if threads == 0 || threads > self.connections {
            return Err(usage("--threads must be 1..=--connections (each thread needs a connection)"));
        }
        let pin = match (self.no_pin, self.cpus.clone()) {
            (true, Some(_)) => return Err(usage("--cpus and --no-pin contradict each other")),
            (true, None) => None,
            (false, Some(CpuList(cpus))) => Some(cpus),
            // Last CPU first: servers (ringnbd included) pin from CPU 0, and
            // a load generator on the same host should not share their cores.
            (false, None) => Some((0..cpus_available.max(1)).rev().collect()),
        };
        let framing_max = match self.headers {
            HeadersArg::Extended => Framing::Extended,
            HeadersArg::Structured => Framing::Structured,
            HeadersArg::Simple => Framing::Simple,
        };
        if self.size == Some(0) {
            return Err(usage("--size must be positive"));
        }
        if self.timeout.is_zero() {
            return Err(usage("--timeout must be positive"));
        }
        let mode = if self.map { self.map_mode(framing_max)? } else { self.load_mode(clock_seed)? };
        Ok(Plan {
            uri,
            connections: self.connections,
            iodepth: self.iodepth,
            threads,
            pin,
            framing_max,
            timeout: self.timeout,
            json: self.json,
            quiet: self.quiet,
            offset: self.offset,
            size: self.size,
            mode,
        })
    }

    fn map_mode(&self, framing_max: Framing) -> Result<Mode, UsageError> {
        if self.verify || self.prefill || self.rate.is_some() || self.ops.is_some() {
            return Err(usage("--map does not combine with --verify, --prefill, --rate or --ops"));
        }
        if framing_max == Framing::Simple {
            return Err(usage("--map needs structured replies or extended headers (not --headers simple)"));
        }
        if self.map_chunk == Some(0) {
            return Err(usage("--map-chunk must be positive"));
        }
        Ok(Mode::Map(MapPlan { chunk: self.map_chunk }))
    }

    fn load_mode(&self, clock_seed: u64) -> Result<Mode, UsageError> {
        if self.map_chunk.is_some() {
            return Err(usage("--map-chunk needs --map"));
        }
        if self.bs == 0 || self.bs > BS_MAX {
            return Err(usage(format!("--bs must be 1..={BS_MAX}")));
        }
        let buffers = u64::from(self.connections) * u64::from(self.iodepth) * self.bs;
        if buffers > BUFFER_BYTES_MAX {
            return Err(usage(format!(
                "connections x iodepth x bs = {buffers} bytes of buffers, more than the {BUFFER_BYTES_MAX} limit"
            )));
        }
        if self.verify && (!self.bs.is_multiple_of(512) || !self.offset.is_multiple_of(512)) {
            return Err(usage("--verify stamps 512-byte sectors: --bs and --offset must be multiples of 512"));
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(usage("--rate must be a positive number of requests per second"));
        }
        if self.ops == Some(0) {
            return Err(usage("--ops must be positive"));
        }
        if self.runtime.is_some_and(|r| r.is_zero()) {
            return Err(usage("--runtime must be positive"));
        }
        let runtime = match (self.runtime, self.ops) {
            (None, None) => Some(RUNTIME_DEFAULT),
            (runtime, _) => runtime,
        };
        let read_percent = self.rw.read_percent(self.rwmix_read);
        // Reads of a region this run never wrote verify nothing, so a
        // read-only verify run writes the region first.
        let prefill = self.prefill || (self.verify && read_percent == 100);
        Ok(Mode::Load(LoadPlan {
            workload: self.rw,
            read_percent,
            bs: self.bs,
            runtime,
            ops: self.ops,
            warmup: self.warmup,
            rate: self.rate,
            verify: self.verify,
            prefill,
            seed: self.seed.unwrap_or(clock_seed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, UsageError> {
        let mut full = vec!["ringnbd-bench", "nbd://127.0.0.1:10809/"];
        full.extend_from_slice(args);
        Args::try_parse_from(full).map_err(|e| usage(e.to_string()))?.validate(8, 77)
    }

    fn load(args: &[&str]) -> LoadPlan {
        match plan(args).unwrap().mode {
            Mode::Load(l) => l,
            Mode::Map(_) => panic!("expected a load plan"),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("1.5M").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_seconds("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_seconds("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_seconds("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_seconds("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Ok(CpuList(vec![0, 1, 2, 3, 8, 10, 11])));
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
    }

    #[test]
    fn defaults() {
        let p = plan(&[]).unwrap();
        assert_eq!((p.connections, p.iodepth, p.threads), (1, 16, 1));
        assert_eq!(p.framing_max, Framing::Extended);
        assert_eq!(p.pin, Some((0..8).rev().collect()), "last CPU first");
        let l = load(&[]);
        assert_eq!(l.workload, Workload::Randread);
        assert_eq!(l.bs, 4096);
        assert_eq!(l.runtime, Some(RUNTIME_DEFAULT));
        assert_eq!(l.seed, 77);
        assert!(l.rate.is_none() && !l.verify && !l.prefill);
    }

    #[test]
    fn full_load_command_line() {
        let line = "--rw randrw --rwmix-read 70 --bs 64k --connections 4 --iodepth 8 --threads 2 --cpus 2-3 \
                    --ops 1000 --warmup 1 --rate 5000 --seed 9";
        let p = plan(&line.split_whitespace().collect::<Vec<_>>()).unwrap();
        assert_eq!((p.connections, p.iodepth, p.threads), (4, 8, 2));
        assert_eq!(p.pin, Some(vec![2, 3]));
        let Mode::Load(l) = p.mode else { panic!() };
        assert_eq!((l.read_percent, l.bs, l.ops, l.runtime), (70, 65536, Some(1000), None));
        assert_eq!((l.warmup, l.rate, l.seed), (Duration::from_secs(1), Some(5000.0), 9));
    }

    #[test]
    fn threads_default_to_min_of_connections_and_cpus() {
        assert_eq!(plan(&["--connections", "32"]).unwrap().threads, 8);
        assert_eq!(plan(&["--connections", "3"]).unwrap().threads, 3);
        assert!(plan(&["--connections", "2", "--threads", "3"]).is_err());
        assert!(plan(&["--no-pin"]).unwrap().pin.is_none());
        assert!(plan(&["--no-pin", "--cpus", "1"]).is_err());
    }

    #[test]
    fn verify_rules() {
        assert!(plan(&["--verify", "--bs", "1000"]).is_err());
        assert!(plan(&["--verify", "--offset", "100"]).is_err());
        assert!(load(&["--verify", "--rw", "randread"]).prefill, "read-only verify prefills");
        assert!(!load(&["--verify", "--rw", "randrw"]).prefill);
        assert!(load(&["--prefill", "--rw", "randrw"]).prefill);
    }

    #[test]
    fn limits_and_conflicts() {
        assert!(plan(&["--connections", "0"]).is_err());
        assert!(plan(&["--iodepth", "1025"]).is_err());
        assert!(plan(&["--bs", "0"]).is_err());
        assert!(plan(&["--bs", "64M"]).is_err());
        assert!(plan(&["--rwmix-read", "101"]).is_err());
        assert!(plan(&["--rate", "0"]).is_err());
        assert!(plan(&["--runtime", "0"]).is_err());
        assert!(plan(&["--ops", "0"]).is_err());
        assert!(plan(&["--size", "0"]).is_err());
        assert!(plan(&["--rw", "sideways"]).is_err());
        assert!(plan(&["--map", "--verify"]).is_err());
        assert!(plan(&["--map", "--headers", "simple"]).is_err());
        assert!(plan(&["--map-chunk", "1G"]).is_err());
        assert!(plan(&["--connections", "1024", "--iodepth", "1024", "--bs", "1M"]).is_err(), "buffer limit");
        let Err(e) = plan(&["nbd://"]) else { panic!() };
        assert!(!e.0.is_empty());
    }

    #[test]
    fn map_command_line() {
        let p = plan(&["--map", "--map-chunk", "8G", "--connections", "2", "--headers", "structured"]).unwrap();
        assert_eq!(p.framing_max, Framing::Structured);
        let Mode::Map(m) = p.mode else { panic!() };
        assert_eq!(m.chunk, Some(8 << 30));
    }

    #[test]
    fn bad_uri_is_a_usage_error() {
        let args = Args::try_parse_from(["ringnbd-bench", "http://x/"]).unwrap();
        assert!(args.validate(1, 0).unwrap_err().0.contains("scheme"));
    }
}
