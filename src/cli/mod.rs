//! Command line, nbdkit-style: `ringnbd [OPTIONS] [EXPORT]...` serves;
//! `ringnbd ctl ...` talks to a running server's control socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::backend::copy_before_write::{ScratchFull, ScratchPolicy};
use crate::engine::worker::{LargeReads, LargeWrites, WorkerConfig, ZeroCopySends};
pub mod config;
pub mod ctl;
pub mod export_spec;

use crate::export::{ExportOptions, ExportSpec, TrackOptions};
use crate::net::activation::ListenEnv;
use crate::server::{Identity, ProcessConfig, SecurityConfig, ServerConfig};
use crate::tls::{CredentialSource, TlsMode};
use export_spec::parse_size;

/// Serve files, block devices or sparse memory over NBD, on io_uring.
#[derive(Debug, Parser)]
#[command(name = "ringnbd", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Exports: `[NAME=]PATH`, `[NAME=]memory:SIZE`, a layered export
    /// `[NAME=]layers:TOP,LOWER[,LOWER...]` (highest first, the top created
    /// when missing) or `[NAME=]throwaway:IMAGE[,LOWER...]` (writable over
    /// read-only layers, writes discarded at exit); doc/layers.md. The first
    /// is also the default export (empty name). Default: `memory:1G`.
    #[arg(value_name = "EXPORT")]
    pub exports: Vec<ExportSpec>,

    /// Read exports and options from a TOML file (doc/config.md). Options
    /// given on the command line win; its exports come first.
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check the config file and the options, print what would be served,
    /// and exit (0: valid, 2: not) without serving.
    #[arg(long)]
    pub check_config: bool,

    /// The config file's exports (filled by `Cli::load`).
    #[arg(skip)]
    pub config_exports: config::ConfigExports,

    /// TCP address to listen on (repeatable). Default 127.0.0.1:10809
    /// unless only --unix is given. Port 0 picks a free port.
    #[arg(short = 'l', long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Unix socket path to listen on (repeatable).
    #[arg(short = 'U', long = "unix", value_name = "PATH")]
    pub unix: Vec<PathBuf>,

    /// Serve every export read-only.
    #[arg(short = 'r', long)]
    pub read_only: bool,

    /// Worker threads, each with its own io_uring (1 to 1024). Default: one
    /// per core.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// Do not pin worker threads to cores.
    #[arg(long)]
    pub no_pin: bool,

    /// Cores for the workers, e.g. `2,3` or `0-3` (worker i gets the i-th,
    /// wrapping). Default: every core. With --threads unset, one worker per
    /// listed core.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuList>,

    /// Which worker gets a new connection: `local` prefers, among the
    /// least-loaded, the one pinned to the core its packets arrive on (for
    /// Unix sockets: the core its handshake ended on), for lower latency
    /// and no cross-core wakeups; `balanced` ignores that
    /// (better for bandwidth-bound clients sharing the server's cores, e.g.
    /// 1 MiB streams over loopback on a 2-core box).
    #[arg(long, value_enum, default_value = "local")]
    pub placement: Placement,

    /// Kernel-side submission polling (IORING_SETUP_SQPOLL): a kernel thread
    /// per ring busy-polls for submissions, saving a syscall per loop turn
    /// at the cost of a core while busy.
    #[arg(long)]
    pub sqpoll: bool,

    /// Milliseconds an idle SQPOLL thread spins before sleeping.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub sqpoll_idle: u32,

    /// Use buffered I/O instead of O_DIRECT for files and devices.
    #[arg(long)]
    pub no_direct: bool,

    /// How reads of 64 KiB and more from files in memory (tmpfs) reach the
    /// socket: in-place (sent from the file's mapping: one copy), splice
    /// (from the page cache through a pipe), or copy (through a buffer).
    /// doc/benchmarks.md measures each.
    #[arg(long, value_enum, value_name = "HOW", default_value = "in-place")]
    pub large_reads: LargeReads,

    /// How writes of 64 KiB and more to files in memory reach the file:
    /// copy (through a buffer) or in-place (received into the file's
    /// mapping; untracked exports without snapshots).
    #[arg(long, value_enum, value_name = "HOW", default_value = "copy")]
    pub large_writes: LargeWrites,

    /// Whether the data of reads of 64 KiB and more that are served from
    /// buffers (files on disk) is sent zero-copy from the buffer: auto
    /// (until the kernel reports it copied anyway, as it does for peers on
    /// this host), on, or off.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pub zero_copy_sends: ZeroCopySends,

    /// Advertise the O_DIRECT alignment as the minimum block size, holding
    /// clients that ask for block sizes to it. By default the minimum is 1
    /// and any alignment is served (read-modify-write where needed).
    #[arg(long)]
    pub strict_alignment: bool,

    /// Largest READ/WRITE payload (e.g. 32M). At least 1M.
    #[arg(long, value_name = "BYTES", default_value = "32M", value_parser = parse_payload)]
    pub max_payload: u32,

    /// Seconds a client may take to negotiate.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub handshake_timeout: f64,

    /// Seconds shutdown waits for in-flight requests before dropping the
    /// connections still busy.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub shutdown_timeout: f64,

    /// Description shown by `nbdinfo --list` and NBD_INFO_DESCRIPTION, as
    /// `NAME=TEXT` for one export or `TEXT` for all (repeatable).
    #[arg(long, value_name = "[NAME=]TEXT")]
    pub description: Vec<String>,

    /// Requests one connection may have in flight (backpressure; 1 to 4096).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub inflight: u16,

    /// Most memory all workers together may use for request buffers (e.g.
    /// 512M). Buffers are mapped as load needs them and returned when idle.
    /// Default: an eighth of physical memory, between 256M and 64G.
    #[arg(long, value_name = "BYTES", value_parser = parse_buffer)]
    pub buffers: Option<usize>,

    /// Seconds a connection may wait on its client (a WRITE payload that
    /// stops arriving, replies it does not read) before it is dropped and
    /// what it holds is freed.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub stall_timeout: f64,

    /// Submission queue entries per ring (8 to 32768).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(8..=32768))]
    pub ring_entries: u32,

    /// Cache allocation lookups of file exports (`off` when other processes
    /// modify the file while it is served; see doc/contexts.md).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub extent_cache: bool,

    /// Extents the cache keeps per export before starting over.
    #[arg(long, value_name = "N", default_value_t = 4 << 20)]
    pub extent_cache_entries: usize,

    /// Descriptors per context in one BLOCK_STATUS reply (the spec suggests
    /// at most 1048576; the rest of the range is left for the next request).
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub max_extents: u32,

    /// Track changes of file exports for incremental backup: per image a
    /// crash-safe state file (beside it as IMAGE.ringnbd, or in
    /// --state-dir), checkpoints, and the qemu:dirty-bitmap:NAME and
    /// ringnbd:era contexts (doc/tracking.md). Memory exports always track,
    /// in memory.
    #[arg(long)]
    pub track: bool,

    /// Directory for change-tracking state files (implies --track).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Tracking granularity for new state files: a power of two from 4K to
    /// 64M (existing state keeps its own). Smaller reports changes more
    /// precisely; each granule costs 4 bytes.
    #[arg(long, value_name = "BYTES", default_value = "64K", value_parser = parse_granularity)]
    pub track_granularity: u32,

    /// Create checkpoint NAME at start where it does not exist yet, on
    /// export EXPORT or on every tracked export (repeatable).
    #[arg(long, value_name = "[EXPORT=]NAME")]
    pub checkpoint: Vec<String>,

    /// Take snapshot NAME (checkpoint NAME and the read-only export
    /// EXPORT@NAME, doc/snapshots.md) at start, of export EXPORT or of every
    /// tracked read-write file export (repeatable).
    #[arg(long, value_name = "[EXPORT=]NAME")]
    pub snapshot: Vec<String>,

    /// Most old data one copy-before-write snapshot may keep in its scratch
    /// file (e.g. 10G; doc/snapshots.md). Default: no limit but the image's
    /// size.
    #[arg(long, value_name = "BYTES", value_parser = parse_scratch)]
    pub snapshot_scratch_max: Option<u64>,

    /// When a snapshot's scratch space runs out: `break` the snapshot (its
    /// readers get EIO, live writes go on) or `fail-writes` (live writes
    /// that need a copy fail with ENOSPC, the snapshot stays whole).
    #[arg(long, value_enum, default_value = "break")]
    pub snapshot_scratch_full: ScratchFullArg,

    /// Serve the control socket (line-delimited JSON, doc/control.md) at
    /// PATH, mode 0600; `ringnbd ctl --control PATH` talks to it.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// STARTTLS: off, on (offered), or require (every option before it is
    /// refused). Defaults to on when credentials are given (doc/tls.md).
    #[arg(long, value_enum, value_name = "MODE")]
    pub tls: Option<TlsMode>,

    /// X.509 credentials: DIR holds ca-cert.pem, server-cert.pem,
    /// server-key.pem and optionally ca-crl.pem (nbdkit's and qemu's layout).
    #[arg(long, value_name = "DIR", conflicts_with = "tls_psk")]
    pub tls_certificates: Option<PathBuf>,

    /// Require client certificates signed by ca-cert.pem.
    #[arg(long, requires = "tls_certificates")]
    pub tls_verify_peer: bool,

    /// PSK credentials in GnuTLS keys.psk format (username:hexkey per line,
    /// made by psktool). Needs a build with `--features psk`.
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,

    /// Serve EXPORT only over TLS (others stay open to plaintext clients
    /// under --tls on). Repeatable.
    #[arg(long, value_name = "EXPORT")]
    pub tls_only: Vec<String>,

    /// Allow-list rule, for all exports or for EXPORT: dn:SUBJECT,
    /// psk:USER, addr:IP[/PREFIX], uid:N. Repeatable (doc/tls.md).
    #[arg(long, value_name = "[EXPORT=]RULE")]
    pub allow: Vec<String>,

    /// Most transmission connections at once, overall or for EXPORT.
    /// Repeatable.
    #[arg(long, value_name = "[EXPORT=]N")]
    pub max_connections: Vec<String>,

    /// Most transmission connections from one client address (one IP, or
    /// one uid on Unix sockets).
    #[arg(long, value_name = "N")]
    pub max_connections_per_address: Option<usize>,

    /// Count requests per export and command, with latency histograms, for
    /// --metrics and `ringnbd ctl stats` (doc/metrics.md).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub stats: bool,

    /// Serve Prometheus metrics over HTTP at ADDR (HOST:PORT), path
    /// /metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Write the server's pid to PATH once its sockets are bound (removed
    /// at exit).
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,

    /// Captive mode: once listening, run CMD with `sh -c`, with $uri, $nbd,
    /// $port, $unixsocket and $exportname set, and exit with its status
    /// when it ends. Without -l or -U it gets a private Unix socket (-U -).
    #[arg(long, value_name = "CMD", conflicts_with = "single")]
    pub run: Option<String>,

    /// Exit once a client has been served and the last connection closes.
    #[arg(long)]
    pub exit_when_idle: bool,

    /// Serve one connection on stdin (a socket, from inetd or libnbd's
    /// nbd_connect_command) and exit when it closes. Nothing is printed to
    /// stdout.
    #[arg(short = 's', long, conflicts_with_all = ["listen", "unix"])]
    pub single: bool,

    /// Become this user (name or uid) once the sockets are bound.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Become this group (name or gid) once the sockets are bound. Default
    /// with --user: the user's primary group.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Log lines as text (`ringnbd: ...`) or one JSON object each, with
    /// fields (doc/operations.md). Logs go to stderr.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    pub log_format: crate::log::Format,

    /// Log connections and protocol errors to stderr.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Why the command line and config could not be read.
#[derive(Debug)]
pub enum LoadError {
    Usage(String),
    Config(String),
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Talk to a running server's control socket.
    Ctl(ctl::CtlArgs),
}

/// `--track-granularity`: log2 of a power of two between 4 KiB and 64 MiB.
fn parse_granularity(text: &str) -> Result<u32, String> {
    let bytes = parse_size(text).map_err(|e| e.to_string())?;
    if !bytes.is_power_of_two() || !(4096..=64 << 20).contains(&bytes) {
        return Err("must be a power of two between 4K and 64M".into());
    }
    Ok(bytes.trailing_zeros())
}

fn parse_payload(text: &str) -> Result<u32, String> {
    let bytes = parse_size(text).map_err(|e| e.to_string())?;
    if !(1 << 20..=u32::MAX as u64).contains(&bytes) {
        return Err("must be between 1M and 4G-1".into());
    }
    Ok(bytes as u32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScratchFullArg {
    Break,
    FailWrites,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    Local,
    Balanced,
}

/// A parsed `--cpus` list (a newtype so clap takes it as one value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

fn parse_cpu_list(text: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad CPU list item {part:?} (use e.g. 0,2-3)");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b - a > 4096 {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cpus.is_empty() {
        return Err("empty CPU list".into());
    }
    Ok(CpuList(cpus))
}

fn parse_switch(text: &str) -> Result<bool, String> {
    match text {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

fn parse_scratch(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

fn parse_buffer(text: &str) -> Result<usize, String> {
    let bytes = parse_size(text).map_err(|e| e.to_string())?;
    if !(16 << 20..=1 << 40).contains(&bytes) {
        return Err("must be between 16M and 1T".into());
    }
    Ok(bytes as usize)
}

/// The smallest budget that holds one largest request (with its alignment
/// scratch) next to the reserve of an eighth (at least 8 MiB) that
/// `engine::buffers::Budget` keeps for new clients.
fn buffers_needed(payload_bytes_max: usize) -> usize {
    let request = payload_bytes_max + 2 * crate::engine::buffers::UNIT_BYTES;
    (request + (8 << 20)).max(request * 8 / 7 + 1)
}

/// The default buffer budget: an eighth of physical memory, within bounds.
fn default_buffer_bytes() -> usize {
    // SAFETY: sysinfo fills a plain struct; all-zero is a valid value to overwrite.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is writable and sized for the call.
    let ram = if unsafe { libc::sysinfo(&mut info) } == 0 {
        info.totalram as u64 * u64::from(info.mem_unit)
    } else {
        4 << 30
    };
    (ram / 8).clamp(256 << 20, 64 << 30) as usize
}

impl Cli {
    /// Parses the command line and, with `--config`, the config file under
    /// the rules in `cli::config`. The error is a message for stderr.
    pub fn load() -> Result<Cli, LoadError> {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).map_err(|e| LoadError::Usage(e.to_string()))?;
        if let Some(path) = cli.config.clone() {
            let (file, exports) = config::read(&path).map_err(LoadError::Config)?;
            let given = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
            cli.apply_config(&file.server, &given)
                .map_err(|e| LoadError::Config(format!("{}: {e}", path.display())))?;
            cli.config_exports = exports;
        }
        Ok(cli)
    }

    pub fn export_specs(&self) -> Vec<ExportSpec> {
        if self.exports.is_empty() {
            return vec!["memory:1G".parse().expect("valid default export")];
        }
        self.exports.clone()
    }

    /// What to open: the config file's exports, then the command line's
    /// (`memory:1G` when there are none at all).
    pub fn export_entries(&self) -> Vec<crate::export::ExportEntry> {
        let mut entries = self.config_exports.entries.clone();
        if entries.is_empty() || !self.exports.is_empty() {
            entries.extend(self.export_specs().into_iter().map(crate::export::ExportEntry::from));
        }
        entries
    }

    pub fn export_options(&self) -> ExportOptions {
        ExportOptions {
            read_only: self.read_only,
            direct_io: !self.no_direct,
            descriptions: self.description.clone(),
            payload_bytes_max: self.max_payload,
            extent_cache_entries: if self.extent_cache { self.extent_cache_entries } else { 0 },
            strict_alignment: self.strict_alignment,
            tracking: TrackOptions {
                files: self.track || self.state_dir.is_some(),
                state_dir: self.state_dir.clone(),
                granule_shift: self.track_granularity,
            },
            checkpoints: self.checkpoint.clone(),
        }
    }

    /// Checks what clap cannot check alone (limits that depend on each
    /// other); the message says which option to change.
    pub fn validate(&self) -> Result<(), String> {
        let budget = self.buffers.unwrap_or_else(default_buffer_bytes);
        let needed = buffers_needed(self.max_payload as usize);
        if budget < needed {
            return Err(format!(
                "--buffers {} MiB cannot hold a --max-payload request and the reserve kept for new clients; \
                 use at least {} MiB",
                budget >> 20,
                needed.div_ceil(1 << 20)
            ));
        }
        if !(self.stall_timeout > 0.0 && self.stall_timeout <= 86400.0) {
            return Err("--stall-timeout must be between 0 and 86400 seconds".into());
        }
        if self.cpus.as_ref().is_some_and(|c| c.0.len() > 1024) && self.threads.is_none() {
            return Err("--cpus lists more than 1024 cores; give --threads".into());
        }
        let credentials = self.tls_certificates.is_some() || self.tls_psk.is_some();
        if matches!(self.tls, Some(TlsMode::On | TlsMode::Require)) && !credentials {
            return Err("--tls on|require needs --tls-certificates DIR or --tls-psk FILE".into());
        }
        for own in &self.config_exports.security {
            if own.tls_only && self.tls_mode() == TlsMode::Off {
                return Err(format!(
                    "export {:?}: tls-only needs TLS ([server] tls-certificates or tls-psk)",
                    own.name
                ));
            }
            for rule in &own.allow {
                rule.parse::<crate::net::access::Rule>()
                    .map_err(|e| format!("export {:?}: allow {rule:?}: {e}", own.name))?;
            }
        }
        if self.metrics.is_some() && !self.stats {
            return Err("--metrics needs request counting (not --stats off)".into());
        }
        if !self.tls_only.is_empty() && self.tls_mode() == TlsMode::Off {
            return Err("--tls-only needs TLS (--tls-certificates or --tls-psk, and not --tls off)".into());
        }
        Ok(())
    }

    /// `--tls`, defaulting to on when credentials are given.
    pub fn tls_mode(&self) -> TlsMode {
        let credentials = self.tls_certificates.is_some() || self.tls_psk.is_some();
        self.tls.unwrap_or(if credentials { TlsMode::On } else { TlsMode::Off })
    }

    fn tls_credentials(&self) -> Option<CredentialSource> {
        match (&self.tls_certificates, &self.tls_psk) {
            (Some(dir), _) => Some(CredentialSource::X509 { dir: dir.clone(), verify_peer: self.tls_verify_peer }),
            (None, Some(file)) => Some(CredentialSource::Psk { file: file.clone() }),
            (None, None) => None,
        }
    }

    /// Definitions of exports added while serving: the config file (read
    /// again on a reload) and the parser of `ctl export add` tables.
    fn definition_source(&self) -> crate::server::DefinitionSource {
        let config = self.config.clone().map(|path| {
            let reading = path.clone();
            let read: Arc<crate::server::ReadConfig> =
                Arc::new(move || config::read(&reading).map(|(_, exports)| exports.definitions()));
            (path, read)
        });
        crate::server::DefinitionSource {
            config,
            at_start: self.config_exports.definitions(),
            parse: Some(Arc::new(config::definition_from_json)),
        }
    }

    pub fn server_config(&self) -> ServerConfig {
        let listed = self.cpus.as_ref().map(|c| c.0.len().min(1024));
        let threads = self
            .threads
            .map(usize::from)
            .or(listed)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(1024));
        let unnamed = self.listen.is_empty() && self.unix.is_empty();
        // A captive command gets a socket of its own; a server started
        // without addresses listens on the NBD port, unless a service
        // manager passes it sockets (then `tcp_defaulted` drops this).
        let (tcp, unix) = match (unnamed, self.single, &self.run) {
            (false, _, _) | (true, true, _) => (self.listen.clone(), self.unix.clone()),
            (true, false, Some(_)) => (Vec::new(), vec![PathBuf::from(crate::server::PRIVATE_SOCKET)]),
            (true, false, None) => (vec!["127.0.0.1:10809".to_owned()], Vec::new()),
        };
        ServerConfig {
            tcp,
            unix,
            process: ProcessConfig {
                pidfile: self.pidfile.clone(),
                run: self.run.clone(),
                exit_when_idle: self.exit_when_idle,
                single: self.single,
                identity: Identity { user: self.user.clone(), group: self.group.clone() },
                activation: ListenEnv::default(),
                tcp_defaulted: unnamed && !self.single && self.run.is_none(),
            },
            threads,
            pin_workers: !self.no_pin,
            cpus: self.cpus.clone().map(|c| c.0).unwrap_or_default(),
            placement_local: self.placement == Placement::Local,
            handshake_timeout: Duration::from_secs_f64(self.handshake_timeout.max(0.001)),
            handshakes_max: 1024,
            buffer_bytes: self.buffers.unwrap_or_else(default_buffer_bytes),
            control: self.control.clone(),
            metrics: self.metrics.clone(),
            snapshots: self.snapshot.clone(),
            snapshot_scratch: ScratchPolicy {
                bytes_max: self.snapshot_scratch_max.unwrap_or(u64::MAX),
                when_full: match self.snapshot_scratch_full {
                    ScratchFullArg::Break => ScratchFull::BreakSnapshot,
                    ScratchFullArg::FailWrites => ScratchFull::FailWrites,
                },
            },
            security: SecurityConfig {
                tls_mode: self.tls_mode(),
                credentials: self.tls_credentials(),
                tls_only: self.tls_only.clone(),
                allow: self.allow.clone(),
                max_connections: self.max_connections.clone(),
                max_connections_per_address: self.max_connections_per_address,
                exports: self.config_exports.security.clone(),
            },
            worker: WorkerConfig {
                ring_entries: self.ring_entries,
                inflight_per_conn_max: usize::from(self.inflight),
                requests_max: 8192,
                payload_bytes_max: self.max_payload,
                extents_max: self.max_extents as usize,
                drain_timeout: Duration::from_secs_f64(self.shutdown_timeout.clamp(0.001, 3600.0)),
                stall_timeout: Duration::from_secs_f64(self.stall_timeout.clamp(0.001, 86400.0)),
                sqpoll_idle_ms: self.sqpoll.then_some(self.sqpoll_idle),
                count_requests: self.stats,
                move_connections: self.placement == Placement::Local,
                large_reads: self.large_reads,
                zero_copy_sends: self.zero_copy_sends,
                large_writes: self.large_writes,
                verbose: self.verbose,
            },
            export_options: self.export_options(),
            definitions: self.definition_source(),
            verbose: self.verbose,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serve_one_gib_of_memory_on_localhost() {
        let cli = Cli::parse_from(["ringnbd"]);
        assert_eq!(cli.export_specs(), vec!["memory:1G".parse::<ExportSpec>().unwrap()]);
        let config = cli.server_config();
        assert_eq!(config.tcp, vec!["127.0.0.1:10809"]);
        assert_eq!(config.worker.payload_bytes_max, 32 << 20);
        assert_eq!(config.handshake_timeout, Duration::from_secs(10));
    }

    #[test]
    fn unix_only_disables_tcp_and_options_parse() {
        let cli = Cli::parse_from([
            "ringnbd",
            "-U",
            "/tmp/s",
            "-r",
            "--threads",
            "3",
            "--max-payload",
            "64M",
            "disk=/tmp/x.img",
        ]);
        let config = cli.server_config();
        assert!(config.tcp.is_empty());
        assert_eq!(config.threads, 3);
        assert_eq!(config.worker.payload_bytes_max, 64 << 20);
        assert!(cli.export_options().read_only);
        assert_eq!(cli.exports[0].name.as_deref(), Some("disk"));
    }

    #[test]
    fn cpu_lists_and_sqpoll_parse() {
        let cli = Cli::parse_from(["ringnbd", "--cpus", "0,2-3", "--sqpoll"]);
        assert_eq!(cli.cpus, Some(CpuList(vec![0, 2, 3])));
        let config = cli.server_config();
        assert_eq!((config.threads, config.cpus.clone()), (3, vec![0, 2, 3]));
        assert_eq!(config.worker.sqpoll_idle_ms, Some(50));
        assert!(Cli::try_parse_from(["ringnbd", "--cpus", "3-1"]).is_err());
        assert!(Cli::try_parse_from(["ringnbd", "--cpus", "x"]).is_err());
        assert_eq!(Cli::parse_from(["ringnbd"]).server_config().worker.sqpoll_idle_ms, None);
        assert!(Cli::parse_from(["ringnbd"]).server_config().placement_local);
        assert!(!Cli::parse_from(["ringnbd", "--placement", "balanced"]).server_config().placement_local);
    }

    #[test]
    fn extent_cache_switch_takes_a_value() {
        assert!(Cli::parse_from(["ringnbd"]).extent_cache);
        assert!(!Cli::parse_from(["ringnbd", "--extent-cache", "off", "memory:1M"]).extent_cache);
        assert!(!Cli::parse_from(["ringnbd", "--extent-cache=off"]).extent_cache);
        assert_eq!(Cli::parse_from(["ringnbd", "--extent-cache=off"]).export_options().extent_cache_entries, 0);
        assert!(Cli::try_parse_from(["ringnbd", "--extent-cache=maybe"]).is_err());
    }

    #[test]
    fn out_of_range_limits_are_refused() {
        assert!(Cli::try_parse_from(["ringnbd", "--max-payload", "4K"]).is_err());
        assert!(Cli::try_parse_from(["ringnbd", "--buffers", "2T"]).is_err());
        assert!(Cli::try_parse_from(["ringnbd", "--buffers", "1M"]).is_err());
        assert!(Cli::try_parse_from(["ringnbd", "bad=memory:1Q"]).is_err());
        for bad in [["--threads", "0"], ["--threads", "1025"], ["--inflight", "0"], ["--ring-entries", "4"]] {
            let err = Cli::try_parse_from(["ringnbd", bad[0], bad[1]]).unwrap_err().to_string();
            assert!(err.contains(bad[0]), "{bad:?}: {err}");
        }
        let small = Cli::parse_from(["ringnbd", "--buffers", "32M"]);
        assert!(small.validate().unwrap_err().contains("--buffers"), "32M cannot hold a 32M request");
        assert!(Cli::parse_from(["ringnbd", "--buffers", "64M"]).validate().is_ok());
        assert!(Cli::parse_from(["ringnbd", "--stall-timeout", "0"]).validate().is_err());
    }

    #[test]
    fn tracking_options_and_the_ctl_subcommand_parse() {
        let cli = Cli::parse_from([
            "ringnbd",
            "--state-dir",
            "/s",
            "--track-granularity",
            "1M",
            "--checkpoint",
            "d=c1",
            "d=/x",
        ]);
        let options = cli.export_options();
        assert!(options.tracking.files, "--state-dir implies --track");
        assert_eq!(options.tracking.granule_shift, 20);
        assert_eq!(options.checkpoints, vec!["d=c1"]);
        assert_eq!(Cli::parse_from(["ringnbd"]).export_options().tracking.granule_shift, 16);
        assert!(Cli::try_parse_from(["ringnbd", "--track-granularity", "3000"]).is_err());
        assert!(Cli::try_parse_from(["ringnbd", "--track-granularity", "1K"]).is_err());
        let ctl = Cli::parse_from(["ringnbd", "ctl", "--control", "/c", "checkpoint", "create", "disk", "mon"]);
        let Some(Command::Ctl(args)) = ctl.command else { panic!("ctl parsed as {:?}", ctl.command) };
        assert_eq!(args.control.as_deref(), Some(std::path::Path::new("/c")));
        assert!(matches!(args.action, ctl::CtlAction::Checkpoint(ctl::CheckpointAction::Create { .. })));
        assert!(Cli::try_parse_from(["ringnbd", "ctl", "checkpoint", "create", "disk"]).is_err(), "NAME is required");
    }

    #[test]
    fn process_options_and_where_captive_and_single_servers_listen() {
        let default = Cli::parse_from(["ringnbd"]).server_config();
        assert!(default.process.tcp_defaulted && default.process.pidfile.is_none());
        let captive = Cli::parse_from(["ringnbd", "--run", "nbdinfo $uri", "--pidfile", "/p"]).server_config();
        assert_eq!((captive.tcp.len(), captive.unix.clone()), (0, vec![PathBuf::from("-")]));
        assert!(!captive.process.tcp_defaulted);
        assert_eq!(captive.process.run.as_deref(), Some("nbdinfo $uri"));
        assert_eq!(captive.process.pidfile.as_deref(), Some(std::path::Path::new("/p")));
        let listed = Cli::parse_from(["ringnbd", "--run", "x", "-l", "127.0.0.1:0"]).server_config();
        assert_eq!((listed.tcp.len(), listed.unix.len()), (1, 0), "a listed address is used as given");
        let single = Cli::parse_from(["ringnbd", "-s", "--user", "nobody"]).server_config();
        assert!(single.process.single && single.tcp.is_empty() && single.unix.is_empty());
        assert_eq!(single.process.identity.user.as_deref(), Some("nobody"));
        assert!(Cli::try_parse_from(["ringnbd", "-s", "-l", "127.0.0.1:0"]).is_err());
        assert!(Cli::try_parse_from(["ringnbd", "-s", "--run", "true"]).is_err());
    }

    #[test]
    fn the_default_buffer_budget_is_a_share_of_memory() {
        let config = Cli::parse_from(["ringnbd"]).server_config();
        assert!((256 << 20..=64 << 30).contains(&config.buffer_bytes));
        assert_eq!(Cli::parse_from(["ringnbd", "--buffers", "1G"]).server_config().buffer_bytes, 1 << 30);
    }
}
