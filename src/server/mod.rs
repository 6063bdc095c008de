//! Wiring: listeners, workers, the accept thread, the control socket, and
//! orderly shutdown on SIGINT/SIGTERM (stop accepting, finish in-flight
//! requests, flush, record clean shutdown for change tracking, exit).

mod banner;
mod captive;
mod control_verbs;
mod export_admin;
mod finish;
mod process;
mod security;
mod stats;
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
use crate::export::{Catalog, Export, ExportOptions};
use crate::net::accept::{AcceptConfig, Dispatch, accept_loop, serve_one};
use crate::net::activation::{self, ActivationError, ListenEnv};
use crate::net::listener::{Listener, NetError};
use crate::proto::handshake::HandshakeLimits;

pub use captive::PRIVATE_SOCKET;
pub use export_admin::{Definition, DefinitionSource, ParseDefinition, ReadConfig};
pub use process::Identity;
pub use security::{ExportSecurity, SecurityConfig};
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
    #[error(transparent)]
    Activation(#[from] ActivationError),
    /// A pid file, an identity, a captive command or stdin is unusable.
    #[error("{0}")]
    Process(String),
}

/// How the process runs: service-manager and script conventions.
#[derive(Debug, Clone, Default)]
pub struct ProcessConfig {
    pub pidfile: Option<PathBuf>,
    /// `--run`: the captive command.
    pub run: Option<String>,
    pub exit_when_idle: bool,
    /// `-s`: one connection on stdin.
    pub single: bool,
    pub identity: Identity,
    /// Sockets a service manager passes (read at start, see `main`).
    pub activation: ListenEnv,
    /// The TCP address was the default, not asked for: it is not bound
    /// when a service manager passes sockets.
    pub tcp_defaulted: bool,
}

/// How serving ended, for the exit status.
#[derive(Debug, Default)]
pub struct Served {
    /// The captive command's exit code, when it ran to its end.
    pub command_status: Option<u8>,
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
    /// The Prometheus endpoint's address (`--metrics`).
    pub metrics: Option<String>,
    /// Scratch space of copy-before-write snapshots.
    pub snapshot_scratch: ScratchPolicy,
    /// `--snapshot [EXPORT=]NAME` values: snapshots taken at start.
    pub snapshots: Vec<String>,
    /// TLS, allow-lists and connection limits.
    pub security: SecurityConfig,
    pub process: ProcessConfig,
    pub worker: WorkerConfig,
    pub verbose: bool,
    /// The options exports added while serving are opened with.
    pub export_options: ExportOptions,
    /// Where exports added while serving, and reloads, get definitions.
    pub definitions: DefinitionSource,
}

pub fn serve(config: ServerConfig, mut exports: Vec<Export>) -> Result<Served, ServerError> {
    let security = config.security.resolve(&mut exports).map_err(ServerError::Security)?;
    // Before anything can print: in -s mode stdout is the client's socket.
    let single = config.process.single.then(take_stdin).transpose()?;
    // Before any thread exists: the control socket is bound under a narrowed umask.
    let control_listener = config.control.clone().map(crate::control::bind).transpose()?;
    let signals = block_signals();
    raise_file_limit();
    let activated = activation::inherited(&config.process.activation)?;
    let metrics_listener = config.metrics.as_deref().map(bind_metrics).transpose()?;
    let (mut listeners, private_dir) = bind_listeners(&config, activated.as_ref().map(|a| a.names.as_slice()))?;
    if let Some(activated) = activated {
        listeners.extend(activated.listeners);
    }
    if listeners.is_empty() && single.is_none() {
        return Err(ServerError::Process("nothing to listen on".into()));
    }
    let pidfile = config
        .process
        .pidfile
        .as_deref()
        .map(|path| {
            process::PidFile::write(path)
                .map_err(|e| ServerError::Process(format!("--pidfile {}: {e}", path.display())))
        })
        .transpose()?;
    if let Some(now) = config.process.identity.assume().map_err(ServerError::Process)? {
        crate::note!("running as {now}");
    }
    let exports: Arc<[Arc<Export>]> = exports.into_iter().map(Arc::new).collect();
    let catalog = Arc::new(Catalog::new(Arc::clone(&exports)));
    let shutdown = Arc::new(AtomicBool::new(false));
    let (workers, threads) = spawn_workers(&config, &shutdown)?;
    let workers = Arc::new(workers);
    let snapshots = Arc::new(Snapshots::default());
    let verbs = Arc::new(control_verbs::Verbs {
        catalog: Arc::clone(&catalog),
        workers: Arc::clone(&workers),
        snapshots: Arc::clone(&snapshots),
        scratch: config.snapshot_scratch,
        started: Instant::now(),
        changing: Mutex::new(()),
        counting: config.worker.count_requests,
        admin: std::sync::OnceLock::new(),
    });
    // Before any client can connect, so scripts find them from the start.
    if let Err(e) = take_start_snapshots(&verbs, &exports, &config.snapshots) {
        snapshots.remove_all();
        return Err(e);
    }

    let stop_request = Arc::new(process::StopRequest::default());
    if config.process.exit_when_idle || single.is_some() {
        let stop = Arc::clone(&stop_request);
        security.limits.when_idle(Box::new(move || stop.stop("the last client disconnected".into())));
    }
    let access = Arc::new(crate::net::access::SharedPolicy::new(security.access));
    let admin = Arc::new(export_admin::ExportAdmin::new(
        Arc::clone(&catalog),
        Arc::clone(&workers),
        Arc::clone(&access),
        Arc::clone(&security.limits),
        config.security.clone(),
        config.export_options.clone(),
        config.definitions.clone(),
        Arc::clone(&snapshots),
    ));
    let _ = verbs.admin.set(Arc::clone(&admin));
    let reaper = {
        let (admin, shutdown) = (Arc::clone(&admin), Arc::clone(&shutdown));
        std::thread::Builder::new()
            .name("ringnbd-exports".into())
            .spawn(move || admin.run_reaper(&shutdown))
            .map_err(system("spawn the export reaper"))?
    };
    let accept_config = Arc::new(AcceptConfig {
        offers: Arc::clone(&catalog) as Arc<dyn Offers>,
        limits_handshake: HandshakeLimits::default(),
        handshake_timeout: config.handshake_timeout,
        handshakes_max: config.handshakes_max,
        verbose: config.verbose,
        shutdown: Arc::clone(&shutdown),
        tls: security.tls.clone(),
        access,
        limits: security.limits,
    });
    let stop = eventfd()?;
    let stop_fd = stop.as_raw_fd();
    let dispatch: Arc<dyn Dispatch> = Arc::clone(&workers) as Arc<dyn Dispatch>;
    let uris: Vec<String> = listeners.iter().map(Listener::uri).collect();
    let captive_variables =
        listeners.first().map(|first| captive::variables(first, &exports[0].info.name)).unwrap_or_default();
    if let Some(socket) = single {
        let (config, dispatch, stop) = (Arc::clone(&accept_config), Arc::clone(&dispatch), Arc::clone(&stop_request));
        std::thread::Builder::new()
            .name("ringnbd-single".into())
            .spawn(move || match serve_one(socket, &config, &*dispatch) {
                Ok(true) => {}
                Ok(false) => stop.stop("the stdin client left before transmission".into()),
                Err(e) => stop.stop(format!("-s: stdin: {e}")),
            })
            .map_err(system("spawn the -s handshake"))?;
    }
    for listener in &listeners {
        listener.set_nonblocking().map_err(system("make a listener non-blocking"))?;
    }
    let accept_stop = stop.try_clone().map_err(system("copy the stop eventfd"))?;
    let acceptor = std::thread::Builder::new()
        .name("ringnbd-accept".into())
        .spawn(move || {
            if let Err(e) = accept_loop(listeners, accept_stop, accept_config, dispatch) {
                // Nothing would ever be served: end the process loudly.
                crate::note!("cannot start accepting clients: {e}");
                std::process::exit(1);
            }
        })
        .map_err(system("spawn acceptor"))?;
    let metrics_endpoint = match metrics_listener {
        Some(listener) => {
            let workers = Arc::clone(&workers);
            let render: Arc<crate::control::metrics_http::Render> = Arc::new(move || {
                stats::Stats::new(workers.count(), workers.snapshots(control_verbs::STATS_WAIT)).prometheus()
            });
            let thread = std::thread::Builder::new()
                .name("ringnbd-metrics-accept".into())
                .spawn(move || crate::control::metrics_http::serve(listener, stop_fd, render))
                .map_err(system("spawn the metrics endpoint"))?;
            Some(thread)
        }
        None => None,
    };
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

    if !config.process.single {
        banner::print_banner(&config, &exports, &uris);
    }
    // From here the catalog and the export admin own the exports: a
    // removed one must not be kept alive by the list it started in.
    drop(exports);
    let captive = config
        .process
        .run
        .as_deref()
        .map(|command| captive::Captive::start(command, &captive_variables, Arc::clone(&stop_request)))
        .transpose()
        .map_err(|e| ServerError::Process(format!("--run: cannot start /bin/sh: {e}")));
    let signal_number = match &captive {
        Ok(_) => loop {
            match wait_for_signal(&signals) {
                libc::SIGHUP => {
                    reload_credentials(security.tls.as_deref());
                    if config.definitions.config.is_some()
                        && let Err(e) = admin.reload(false)
                    {
                        crate::note!("SIGHUP: the config file was not applied: {}", e.message);
                    }
                }
                other => break other,
            }
        },
        Err(_) => 0,
    };
    match stop_request.reason() {
        Some(reason) => crate::note!("{reason}: finishing in-flight requests"),
        None if signal_number != 0 => crate::note!("signal {signal_number}: finishing in-flight requests"),
        None => {}
    }
    // A command that never started ends the server as an error, after the
    // same orderly shutdown.
    let (command_status, captive_error) = match captive {
        Ok(Some(command)) => (command.finish(), None),
        Ok(None) => (None, None),
        Err(e) => (None, Some(e)),
    };

    shutdown.store(true, Ordering::Release);
    admin.wake_reaper();
    signal(&stop);
    let _ = acceptor.join();
    if let Some(controller) = controller {
        let _ = controller.join();
    }
    if let Some(endpoint) = metrics_endpoint {
        let _ = endpoint.join();
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
    let _ = reaper.join();
    // Every image served, including those added while serving and those
    // of removed exports still finishing; snapshots are released below.
    for image in admin.images() {
        finish::finish_image(&image, export_admin::opened_writable(&image));
    }
    admin.clear();
    // Snapshots last as long as the server (doc/snapshots.md).
    snapshots.remove_all();
    drop((pidfile, private_dir));
    if let Some(e) = captive_error {
        return Err(e);
    }
    first_error.map_or(Ok(Served { command_status }), |e| Err(e.into()))
}

/// The `--metrics` listener, on the first address ADDR resolves to.
fn bind_metrics(address: &str) -> Result<std::net::TcpListener, ServerError> {
    let at = crate::net::listener::resolve(address)?[0];
    let listener =
        std::net::TcpListener::bind(at).map_err(|source| NetError::Bind { what: format!("--metrics {at}"), source })?;
    let bound = listener.local_addr().map_or_else(|_| at.to_string(), |a| a.to_string());
    crate::note!("metrics at http://{bound}/metrics");
    Ok(listener)
}

/// Binds the configured addresses and sockets (`-U -`: a private one). The
/// default TCP address is left out when a service manager passed sockets.
fn bind_listeners(
    config: &ServerConfig,
    inherited: Option<&[String]>,
) -> Result<(Vec<Listener>, Option<captive::PrivateDir>), ServerError> {
    let mut listeners = Vec::new();
    let skip_default = inherited.is_some() && config.process.tcp_defaulted;
    for address in config.tcp.iter().filter(|_| !skip_default) {
        listeners.extend(Listener::bind_tcp(address)?);
    }
    let mut private_dir = None;
    for path in &config.unix {
        if captive::is_private(path) {
            let dir = captive::PrivateDir::create()
                .map_err(|e| ServerError::Process(format!("-U -: cannot make a private directory: {e}")))?;
            listeners.push(Listener::bind_unix(dir.socket())?);
            private_dir = Some(dir);
        } else {
            listeners.push(Listener::bind_unix(path.clone())?);
        }
    }
    if let Some(names) = inherited {
        crate::note!("socket activation: {} socket(s) passed ({})", names.len(), names.join(", "));
    }
    Ok((listeners, private_dir))
}

/// `-s`: the client socket on stdin, with stdout pointed at /dev/null so
/// nothing this process prints reaches the client (and the socket closes
/// when the connection does, not when the process exits).
fn take_stdin() -> Result<std::os::fd::OwnedFd, ServerError> {
    use std::os::fd::FromRawFd;
    let bad = |what: &str| ServerError::Process(format!("-s: {what}: {}", std::io::Error::last_os_error()));
    // Close-on-exec like every other descriptor here.
    // SAFETY: fcntl duplicating fd 0, which is open for the life of the
    // process; from now on the OwnedFd is the copy's only owner.
    let socket = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
    if socket < 0 {
        return Err(bad("stdin"));
    }
    // SAFETY: `socket` was just returned by dup and is owned by nobody else.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(socket) };
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| ServerError::Process(format!("-s: /dev/null: {e}")))?;
    for fd in [0, 1] {
        // SAFETY: dup2 onto the standard descriptors from an open file.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) } < 0 {
            return Err(bad("redirecting stdio"));
        }
    }
    Ok(socket)
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
            crate::note!("serving snapshot {:?}", crate::export::snapshot::export_name(export, name));
        }
    }
    Ok(())
}

/// SIGHUP: new handshakes use credentials read afresh; connections already
/// encrypted keep theirs. A directory that no longer loads leaves the old
/// credentials in use.
fn reload_credentials(tls: Option<&crate::tls::TlsServer>) {
    match tls.map(crate::tls::TlsServer::reload) {
        None => crate::note!("SIGHUP: no TLS credentials to reload"),
        Some(Ok(())) => crate::note!("SIGHUP: TLS credentials reloaded"),
        Some(Err(e)) => crate::note!("SIGHUP: keeping the old TLS credentials: {e}"),
    }
}
