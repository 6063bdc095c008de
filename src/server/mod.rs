//! Wiring: listeners, workers, the accept thread, the control socket, and
//! orderly shutdown on SIGINT/SIGTERM (stop accepting, finish in-flight
//! requests, flush, record clean shutdown for change tracking, exit).

mod banner;
mod control_verbs;
mod security;
mod system;
mod workers;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::backend::Backend;
use crate::backend::copy_before_write::ScratchPolicy;
use crate::engine::EngineError;
use crate::engine::handoff::Offers;
use crate::engine::worker::WorkerConfig;
use crate::export::snapshot::Snapshots;
use crate::export::{self, Catalog, Export, Image};
use crate::net::accept::{AcceptConfig, Dispatch, accept_loop};
use crate::net::listener::{Listener, NetError};
use crate::proto::handshake::HandshakeLimits;
use crate::track::ImageStat;

pub use security::SecurityConfig;
use system::{block_signals, eventfd, raise_file_limit, signal, system, wait_for_signal};
use workers::spawn_workers;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("worker: {0}")]
    Engine(#[from] EngineError),
    /// Threads, eventfds or signal masks could not be set up.
    #[error("{what}: {source}")]
    System { what: &'static str, source: std::io::Error },
    /// A `--snapshot` could not be taken.
    #[error("--snapshot {spec}: {message}")]
    Snapshot { spec: String, message: String },
    /// TLS credentials, access rules or connection limits are unusable.
    #[error("{0}")]
    Security(String),
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub tcp: Vec<String>,
    pub unix: Vec<PathBuf>,
    pub threads: usize,
    pub pin_workers: bool,
    /// Cores to pin workers to, in order (wrapping); empty: all cores.
    pub cpus: Vec<usize>,
    /// Prefer the worker on the connection's incoming core (`--placement local`).
    pub placement_local: bool,
    pub handshake_timeout: Duration,
    pub handshakes_max: usize,
    /// Buffer memory all workers together may use (`--buffers`).
    pub buffer_bytes: usize,
    /// The control socket (`--control`).
    pub control: Option<PathBuf>,
    /// Scratch space of copy-before-write snapshots.
    pub snapshot_scratch: ScratchPolicy,
    /// `--snapshot [EXPORT=]NAME` values: snapshots taken at start.
    pub snapshots: Vec<String>,
    /// TLS, allow-lists and connection limits.
    pub security: SecurityConfig,
    pub worker: WorkerConfig,
    pub verbose: bool,
}

pub fn serve(config: ServerConfig, mut exports: Vec<Export>) -> Result<(), ServerError> {
    let security = config.security.resolve(&mut exports).map_err(ServerError::Security)?;
    // Before any thread exists: the control socket is bound under a narrowed umask.
    let control_listener = config.control.clone().map(crate::control::bind).transpose()?;
    let signals = block_signals();
    raise_file_limit();
    let mut listeners = Vec::new();
    for address in &config.tcp {
        listeners.extend(Listener::bind_tcp(address)?);
    }
    for path in &config.unix {
        listeners.push(Listener::bind_unix(path.clone())?);
    }
    let exports: Arc<[Arc<Export>]> = exports.into_iter().map(Arc::new).collect();
    let catalog = Arc::new(Catalog::new(Arc::clone(&exports)));
    let shutdown = Arc::new(AtomicBool::new(false));
    let (workers, threads) = spawn_workers(&config, &exports, &shutdown)?;
    let workers = Arc::new(workers);
    let snapshots = Arc::new(Snapshots::default());
    let verbs = Arc::new(control_verbs::Verbs {
        catalog: Arc::clone(&catalog),
        workers: Arc::clone(&workers),
        snapshots: Arc::clone(&snapshots),
        scratch: config.snapshot_scratch,
        started: Instant::now(),
        changing: Mutex::new(()),
    });
    // Before any client can connect, so scripts find them from the start.
    if let Err(e) = take_start_snapshots(&verbs, &exports, &config.snapshots) {
        snapshots.remove_all();
        return Err(e);
    }

    let accept_config = Arc::new(AcceptConfig {
        offers: Arc::clone(&catalog) as Arc<dyn Offers>,
        limits_handshake: HandshakeLimits::default(),
        handshake_timeout: config.handshake_timeout,
        handshakes_max: config.handshakes_max,
        verbose: config.verbose,
        shutdown: Arc::clone(&shutdown),
        tls: security.tls.clone(),
        access: security.access,
        limits: security.limits,
    });
    let stop = eventfd()?;
    let stop_fd = stop.as_raw_fd();
    let dispatch: Arc<dyn Dispatch> = Arc::clone(&workers) as Arc<dyn Dispatch>;
    let uris: Vec<String> = listeners.iter().map(Listener::uri).collect();
    let acceptor = std::thread::Builder::new()
        .name("ringnbd-accept".into())
        .spawn(move || {
            accept_loop(&listeners, stop_fd, accept_config, dispatch);
            drop(listeners); // removes Unix socket files
        })
        .map_err(system("spawn acceptor"))?;
    let controller = match control_listener {
        Some(listener) => {
            let handler: Arc<dyn crate::control::Handler> = Arc::clone(&verbs) as _;
            let thread = std::thread::Builder::new()
                .name("ringnbd-control-accept".into())
                .spawn(move || crate::control::serve(listener, stop_fd, handler))
                .map_err(system("spawn control"))?;
            Some(thread)
        }
        None => None,
    };

    banner::print_banner(&config, &exports, &uris);
    let signal_number = loop {
        match wait_for_signal(&signals) {
            libc::SIGHUP => reload_credentials(security.tls.as_deref()),
            other => break other,
        }
    };
    eprintln!("ringnbd: signal {signal_number}: finishing in-flight requests");

    shutdown.store(true, Ordering::Release);
    signal(&stop);
    let _ = acceptor.join();
    if let Some(controller) = controller {
        let _ = controller.join();
    }
    // Handshake threads may still hold `workers`; a connection they hand
    // over now is closed by its draining worker.
    workers.wake_all();
    let mut first_error = None;
    for thread in threads {
        if let Ok(Err(e)) = thread.join() {
            first_error.get_or_insert(e);
        }
    }
    for image in export::images(&exports) {
        finish_image(&image, exports.iter().any(|e| !e.read_only && Arc::ptr_eq(&e.image, &image)));
    }
    // Snapshots last as long as the server (doc/snapshots.md).
    snapshots.remove_all();
    first_error.map_or(Ok(()), |e| Err(e.into()))
}

/// `--snapshot [EXPORT=]NAME`: on EXPORT when it names one, else on every
/// tracked read-write file export.
fn take_start_snapshots(
    verbs: &control_verbs::Verbs,
    exports: &[Arc<Export>],
    wanted: &[String],
) -> Result<(), ServerError> {
    use crate::control::Handler;
    for spec in wanted {
        let named = spec.split_once('=').filter(|(export, _)| exports.iter().any(|e| e.info.name == *export));
        let (targets, name): (Vec<&str>, &str) = match named {
            Some((export, name)) => (vec![export], name),
            None => {
                let tracked = exports
                    .iter()
                    .filter(|e| e.image.track.is_some() && !e.read_only && matches!(e.image.backend, Backend::File(_)));
                (tracked.map(|e| e.info.name.as_str()).collect(), spec.as_str())
            }
        };
        if targets.is_empty() {
            let message = "no tracked read-write file export to snapshot (add --track)".to_owned();
            return Err(ServerError::Snapshot { spec: spec.clone(), message });
        }
        for export in targets {
            let verb =
                crate::control::protocol::Verb::SnapshotCreate { export: export.to_owned(), name: name.to_owned() };
            verbs.handle(&verb).map_err(|e| ServerError::Snapshot { spec: spec.clone(), message: e.message })?;
            eprintln!("ringnbd: serving snapshot {:?}", crate::export::snapshot::export_name(export, name));
        }
    }
    Ok(())
}

/// The last thing done to an image: flush it, then record the clean
/// shutdown of its change tracking with the size and modification time it
/// ends with, so changes made while ringnbd is not running are noticed.
fn finish_image(image: &Image, writable: bool) {
    if let Backend::Layered(layers) = &image.backend
        && writable
        && !layers.throwaway
        && let Err(e) = layers.top.sync()
    {
        eprintln!("ringnbd: {}: final flush failed: {e}", layers.top.path.display());
    }
    let Backend::File(file) = &image.backend else { return };
    if writable && let Err(e) = file.sync() {
        eprintln!("ringnbd: {}: final flush failed: {e}", file.path.display());
        // Not clean: the next start treats it like a crash (marks still cover it).
        return;
    }
    let Some(tracker) = &image.track else { return };
    let Ok(metadata) = file.metadata() else { return };
    wait_past_modification_time(&metadata);
    if let Err(e) = tracker.shut_down_cleanly(ImageStat::of(&metadata, file.size)) {
        eprintln!("ringnbd: {}: could not record the clean shutdown: {e}", file.path.display());
    }
}

/// Waits until the clock used for file timestamps has moved past the
/// image's modification time, so any later write (by anyone) leaves a
/// different one. Timestamps come from a coarse clock (a few milliseconds);
/// a file system that keeps whole seconds (nanoseconds all zero) makes this
/// wait up to a second.
fn wait_past_modification_time(metadata: &std::fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    let (seconds, nanos) = (metadata.mtime(), metadata.mtime_nsec());
    let whole_seconds = nanos == 0;
    for _ in 0..2000 {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
        let past = if whole_seconds { now.tv_sec > seconds } else { (now.tv_sec, now.tv_nsec) > (seconds, nanos) };
        if past {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGHUP: new handshakes use credentials read afresh; connections already
/// encrypted keep theirs. A directory that no longer loads leaves the old
/// credentials in use.
fn reload_credentials(tls: Option<&crate::tls::TlsServer>) {
    match tls.map(crate::tls::TlsServer::reload) {
        None => eprintln!("ringnbd: SIGHUP: no TLS credentials to reload"),
        Some(Ok(())) => eprintln!("ringnbd: SIGHUP: TLS credentials reloaded"),
        Some(Err(e)) => eprintln!("ringnbd: SIGHUP: keeping the old TLS credentials: {e}"),
    }
}
