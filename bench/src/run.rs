//! Wiring a [`Plan`] into a run: connect and negotiate every connection,
//! check the export against the plan, start one pinned worker per thread,
//! print progress, join, merge.
//!
//! Threads: the main thread connects, then only watches (progress lines,
//! joining). Worker `t` owns connections `t, t + threads, ...`, its own
//! ring and its own statistics; nothing is shared while measuring except
//! the abort flag and the progress counters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringnbd::proto::wire::{TF_CAN_MULTI_CONN, TF_READ_ONLY};
use thiserror::Error;

use crate::cli::{LoadPlan, MapPlan, Mode, Plan};
use crate::conn::Conn;
use crate::connect::{self, ConnectError};
use crate::engine::{EngineError, Worker};
use crate::load::{LoadConfig, LoadJob};
use crate::map::{self, ChunkSummary, MapJob};
use crate::progress::{self, Progress, Snapshot};
use crate::report::{LoadReport, MapReport, RunInfo};
use crate::stats::{OpStats, Stats};
use crate::tls::Socket;
use crate::verify::VERIFY_BLOCKS_MAX;
use crate::workload::Rng;
use ringnbd::proto::client::codec::Framing;
use ringnbd::proto::client::handshake::{HandshakeConfig, Session};

/// Without extended headers a request length is 32-bit; this stays below
/// 4 GiB and is a multiple of every legal minimum block size (<= 64 KiB).
pub const COMPACT_MAP_CHUNK_MAX: u64 = (4 << 30) - (1 << 20);
/// Default map chunks are a multiple of this (alignment as above).
const MAP_CHUNK_ALIGN: u64 = 1 << 20;
/// Progress lines appear only on runs planned longer than this.
const PROGRESS_MIN_RUN: Duration = Duration::from_secs(2);
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RunError {
    /// The plan does not fit the export.
    #[error("{0}")]
    Export(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A thread could not be started or panicked.
    #[error("{0}")]
    Thread(String),
}

/// Boxed: reports carry histograms and are made once per run.
pub enum Outcome {
    Load(Box<LoadReport>),
    Map(Box<MapReport>),
}

pub fn run(plan: &Plan) -> Result<Outcome, RunError> {
    let config = HandshakeConfig {
        export: plan.uri.export.clone(),
        framing_max: plan.framing_max,
        base_allocation: matches!(plan.mode, Mode::Map(_)),
        // Set by `connect` for nbds:// URIs.
        starttls: false,
    };
    let mut connections = Vec::with_capacity(plan.connections as usize);
    // Connect each connection from the core of the thread that will drive
    // it: a server may place a connection next to where its packets come
    // from (ringnbd reads SO_INCOMING_CPU after the handshake), as it would
    // for a client that connects from its I/O thread.
    let affinity = current_affinity();
    for global in 0..plan.connections as usize {
        pin(plan, global % plan.threads as usize);
        let connected = connect::connect(&plan.uri, &config, plan.timeout);
        if connected.is_err() {
            restore_affinity(&affinity);
        }
        connections.push(connected?);
    }
    restore_affinity(&affinity);
    let session = connections[0].1.clone();
    if let Some((_, other)) = connections.iter().find(|(_, s)| s.size != session.size || s.framing != session.framing) {
        return Err(RunError::Export(format!(
            "connections negotiated differently ({} bytes with {}, then {} bytes with {})",
            session.size,
            session.framing.name(),
            other.size,
            other.framing.name()
        )));
    }
    if plan.connections > 1 && session.flags & TF_CAN_MULTI_CONN == 0 {
        eprintln!(
            "ringnbd-bench: warning: the server does not advertise CAN_MULTI_CONN; using several connections anyway"
        );
    }
    let info = run_info(plan, &session)?;
    match &plan.mode {
        Mode::Load(load) => run_load(plan, load, connections, info).map(|r| Outcome::Load(Box::new(r))),
        Mode::Map(map) => run_map(plan, map, connections, info).map(|r| Outcome::Map(Box::new(r))),
    }
}

fn run_info(plan: &Plan, session: &Session) -> Result<RunInfo, RunError> {
    let export_bytes = session.size;
    if plan.offset >= export_bytes {
        return Err(RunError::Export(format!("--offset {} is past the export's {export_bytes} bytes", plan.offset)));
    }
    let region_bytes = plan.size.unwrap_or(export_bytes - plan.offset);
    if plan.offset.checked_add(region_bytes).is_none_or(|end| end > export_bytes) {
        return Err(RunError::Export(format!(
            "region {} + {region_bytes} bytes extends past the export's {export_bytes} bytes",
            plan.offset
        )));
    }
    let minimum = u64::from(session.block_sizes.minimum);
    if !plan.offset.is_multiple_of(minimum) {
        return Err(RunError::Export(format!("--offset must be a multiple of the minimum block size {minimum}")));
    }
    Ok(RunInfo {
        uri: plan.uri.to_string(),
        framing: session.framing,
        extended_refused: session.extended_refused,
        export_bytes,
        block_sizes: session.block_sizes,
        connections: plan.connections,
        iodepth: plan.iodepth,
        threads: plan.threads,
        region_offset: plan.offset,
        region_bytes,
    })
}

fn check_load(load: &LoadPlan, session: &Session, info: &RunInfo, connections: u32) -> Result<u64, RunError> {
    let sizes = session.block_sizes;
    if !load.bs.is_multiple_of(u64::from(sizes.minimum)) {
        return Err(RunError::Export(format!("--bs must be a multiple of the minimum block size {}", sizes.minimum)));
    }
    if load.bs > u64::from(sizes.maximum) {
        return Err(RunError::Export(format!("--bs is larger than the server's maximum payload {}", sizes.maximum)));
    }
    let writes = load.read_percent < 100 || load.prefill;
    if writes && session.flags & TF_READ_ONLY != 0 {
        return Err(RunError::Export("the export is read-only; this workload writes".into()));
    }
    let blocks = info.region_bytes / load.bs;
    if blocks < u64::from(connections) {
        return Err(RunError::Export(format!(
            "the region holds {blocks} blocks of {} bytes; every connection needs at least one",
            load.bs
        )));
    }
    if load.verify && blocks > VERIFY_BLOCKS_MAX {
        return Err(RunError::Export(format!(
            "--verify tracks at most {VERIFY_BLOCKS_MAX} blocks; the region has {blocks} (use --size or a larger --bs)"
        )));
    }
    Ok(blocks)
}

/// Makes the workers start measuring together: the last to arrive sets
/// the common start time.
struct Gate {
    state: Mutex<(usize, Option<Instant>)>,
    ready: Condvar,
    total: usize,
}

impl Gate {
    fn new(total: usize) -> Self {
        Gate { state: Mutex::new((0, None)), ready: Condvar::new(), total }
    }

    /// `None` if the run was aborted while waiting.
    fn arrive(&self, abort: &AtomicBool) -> Option<Instant> {
        let mut state = self.state.lock().expect("gate lock");
        state.0 += 1;
        if state.0 == self.total {
            state.1 = Some(Instant::now());
            self.ready.notify_all();
        }
        loop {
            if let Some(start) = state.1 {
                return Some(start);
            }
            if abort.load(Ordering::Relaxed) {
                return None;
            }
            state = self.ready.wait_timeout(state, Duration::from_millis(50)).expect("gate lock").0;
        }
    }

    fn start(&self) -> Option<Instant> {
        self.state.lock().expect("gate lock").1
    }
}

/// What every worker shares.
struct Shared {
    abort: AtomicBool,
    gate: Gate,
}

/// Splits connections among threads: thread `t` gets `t, t + threads, ...`.
fn partition(connections: Vec<(Socket, Session)>, threads: usize) -> Vec<Vec<(usize, Socket, Session)>> {
    let mut parts: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
    for (global, (fd, session)) in connections.into_iter().enumerate() {
        parts[global % threads].push((global, fd, session));
    }
    parts
}

/// The calling thread's CPU mask, to undo the pinning done while connecting.
fn current_affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; zero is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (rc == 0).then_some(set)
}

fn restore_affinity(set: &Option<libc::cpu_set_t>) {
    if let Some(set) = set {
        // SAFETY: `set` came from sched_getaffinity for this thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    }
}

fn pin(plan: &Plan, thread: usize) {
    if let Some(cpus) = &plan.pin
        && !cpus.is_empty()
    {
        let id = cpus[thread % cpus.len()];
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            eprintln!("ringnbd-bench: warning: cannot pin thread {thread} to CPU {id}");
        }
    }
}

/// Runs `body` on one named thread per part; a failing worker raises the
/// abort flag so the others stop instead of running to the end.
fn spawn<T: Send + 'static>(
    parts: Vec<Vec<(usize, Socket, Session)>>,
    shared: &Arc<Shared>,
    body: impl Fn(usize, Vec<(usize, Socket, Session)>, &Shared) -> Result<T, EngineError> + Send + Sync + 'static,
) -> Result<Vec<JoinHandle<Result<T, EngineError>>>, RunError> {
    let body = Arc::new(body);
    let mut handles = Vec::new();
    for (thread, part) in parts.into_iter().enumerate() {
        let shared = Arc::clone(shared);
        let body = Arc::clone(&body);
        let handle = std::thread::Builder::new()
            .name(format!("ringnbd-bench-{thread}"))
            .spawn(move || {
                let result = body(thread, part, &shared);
                if result.is_err() {
                    shared.abort.store(true, Ordering::Relaxed);
                }
                result
            })
            .map_err(|e| RunError::Thread(format!("cannot start a worker thread: {e}")))?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Joins every worker; the first real error wins over "aborted".
fn join<T>(handles: Vec<JoinHandle<Result<T, EngineError>>>) -> Result<Vec<T>, RunError> {
    let mut results = Vec::new();
    let mut first_error: Option<EngineError> = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(value)) => results.push(value),
            Ok(Err(e)) => {
                let replace = match &first_error {
                    None => true,
                    Some(EngineError::Aborted) => !matches!(e, EngineError::Aborted),
                    Some(_) => false,
                };
                if replace {
                    first_error = Some(e);
                }
            }
            Err(_) => return Err(RunError::Thread("a worker thread panicked".into())),
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(results),
    }
}

/// Prints a progress line a second until every handle has finished.
fn watch<T>(
    handles: &[JoinHandle<T>],
    progress: &[Arc<Progress>],
    shared: &Shared,
    planned: Option<Duration>,
    label: impl Fn(Option<Instant>, Instant) -> &'static str,
    quiet: bool,
) {
    let began = Instant::now();
    let show = !quiet && planned.is_none_or(|p| p > PROGRESS_MIN_RUN);
    let mut last = Snapshot::default();
    let mut last_at = began;
    while !handles.iter().all(JoinHandle::is_finished) {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if now.duration_since(last_at) < PROGRESS_INTERVAL {
            continue;
        }
        let snapshots: Vec<Snapshot> = progress.iter().map(|p| p.snapshot()).collect();
        let total = Snapshot::sum(&snapshots);
        let long_enough = planned.is_some() || now.duration_since(began) >= PROGRESS_MIN_RUN;
        if show && long_enough && !shared.abort.load(Ordering::Relaxed) {
            let tag = label(shared.gate.start(), now);
            eprintln!("{}", progress::line(now.duration_since(began), tag, &last, &total, now.duration_since(last_at)));
        }
        last = total;
        last_at = now;
    }
}

fn run_load(
    plan: &Plan,
    load: &LoadPlan,
    connections: Vec<(Socket, Session)>,
    info: RunInfo,
) -> Result<LoadReport, RunError> {
    let session = connections[0].1.clone();
    let blocks = check_load(load, &session, &info, plan.connections)?;
    let config = LoadConfig {
        region_offset: info.region_offset,
        bs: load.bs,
        blocks,
        connections: u64::from(plan.connections),
        random: load.workload.is_random(),
        read_percent: load.read_percent,
        verify: load.verify,
        seed: load.seed,
        ops: load.ops,
        rate: load.rate,
    };
    let threads = plan.threads as usize;
    let shared = Arc::new(Shared { abort: AtomicBool::new(false), gate: Gate::new(threads) });
    let progress: Vec<Arc<Progress>> = (0..threads).map(|_| Arc::new(Progress::default())).collect();
    let (iodepth, timeout, warmup, runtime) = (plan.iodepth as usize, plan.timeout, load.warmup, load.runtime);
    let (prefill, plan_for_threads, worker_progress) = (load.prefill, plan.clone(), progress.clone());
    let handles = spawn(partition(connections, threads), &shared, move |thread, part, shared| {
        pin(&plan_for_threads, thread);
        let globals: Vec<u64> = part.iter().map(|(g, _, _)| *g as u64).collect();
        let mut rng = Rng::new(config.seed ^ thread as u64);
        let conns = part
            .into_iter()
            .map(|(global, fd, session)| {
                let mut conn = Conn::new(fd, global, &session, iodepth, config.bs as usize);
                if !config.verify {
                    conn.fill_data(|| rng.next_u64());
                }
                conn
            })
            .collect();
        let mut worker = Worker::new(conns, timeout)?;
        let mut job = LoadJob::new(config.clone(), &globals, iodepth, Arc::clone(&worker_progress[thread]));
        if prefill {
            worker.run(&mut job, &shared.abort)?;
        }
        let start = shared.gate.arrive(&shared.abort).ok_or(EngineError::Aborted)?;
        let warmup_end = start + warmup;
        job.start_measuring(start, warmup_end, runtime.map(|r| warmup_end + r));
        worker.run(&mut job, &shared.abort)?;
        worker.disconnect()?;
        Ok(job.stats)
    })?;
    let planned = runtime.map(|r| r + warmup);
    watch(
        &handles,
        &progress,
        &shared,
        planned,
        |start, now| match start {
            None => " prefill",
            Some(start) if now < start + warmup => " warmup",
            Some(_) => "",
        },
        plan.quiet,
    );
    let mut stats = Stats::default();
    for part in join(handles)? {
        stats.merge(&part);
    }
    Ok(LoadReport {
        info,
        workload: load.workload,
        read_percent: load.read_percent,
        bs: load.bs,
        rate: load.rate,
        warmup_seconds: load.warmup.as_secs_f64(),
        seed: load.seed,
        verify: load.verify,
        prefill: load.prefill,
        stats,
    })
}

/// Bytes per BLOCK_STATUS request.
fn map_chunk_bytes(map: &MapPlan, plan: &Plan, info: &RunInfo) -> Result<u64, RunError> {
    let minimum = u64::from(info.block_sizes.minimum);
    let compact = info.framing != Framing::Extended;
    if let Some(chunk) = map.chunk {
        if !chunk.is_multiple_of(minimum) {
            return Err(RunError::Export(format!(
                "--map-chunk must be a multiple of the minimum block size {minimum}"
            )));
        }
        if compact && chunk > u64::from(u32::MAX) {
            return Err(RunError::Export(format!(
                "--map-chunk above 4 GiB needs extended headers, and the server uses {}",
                info.framing.name()
            )));
        }
        return Ok(chunk);
    }
    let slots = u64::from(plan.connections) * u64::from(plan.iodepth);
    let even = info.region_bytes.div_ceil(slots).div_ceil(MAP_CHUNK_ALIGN).max(1) * MAP_CHUNK_ALIGN;
    Ok(if compact { even.min(COMPACT_MAP_CHUNK_MAX) } else { even })
}

fn run_map(
    plan: &Plan,
    map: &MapPlan,
    connections: Vec<(Socket, Session)>,
    info: RunInfo,
) -> Result<MapReport, RunError> {
    let chunk_bytes = map_chunk_bytes(map, plan, &info)?;
    let region_end = info.region_offset + info.region_bytes;
    let all_chunks = map::chunks(info.region_offset, region_end, chunk_bytes);
    let count = connections.len();
    let assigned: Vec<Vec<(u64, u64)>> =
        (0..count).map(|c| all_chunks.iter().skip(c).step_by(count).copied().collect()).collect();
    let threads = plan.threads as usize;
    let shared = Arc::new(Shared { abort: AtomicBool::new(false), gate: Gate::new(threads) });
    let progress: Vec<Arc<Progress>> = (0..threads).map(|_| Arc::new(Progress::default())).collect();
    let (iodepth, timeout, plan_for_threads, worker_progress) =
        (plan.iodepth as usize, plan.timeout, plan.clone(), progress.clone());
    let handles = spawn(partition(connections, threads), &shared, move |thread, part, shared| {
        pin(&plan_for_threads, thread);
        let mine: Vec<Vec<(u64, u64)>> = part.iter().map(|(g, _, _)| assigned[*g].clone()).collect();
        let conns = part.into_iter().map(|(global, fd, session)| Conn::new(fd, global, &session, iodepth, 0)).collect();
        let mut worker = Worker::new(conns, timeout)?;
        let mut job = MapJob::new(mine, iodepth, Arc::clone(&worker_progress[thread]));
        let start = shared.gate.arrive(&shared.abort).ok_or(EngineError::Aborted)?;
        worker.run(&mut job, &shared.abort)?;
        let end = Instant::now();
        worker.disconnect()?;
        Ok((job.chunks, job.latency, start, end))
    })?;
    watch(&handles, &progress, &shared, None, |_, _| " map", plan.quiet);
    let mut chunks: Vec<ChunkSummary> = Vec::new();
    let mut latency = OpStats::new();
    let mut window: Option<(Instant, Instant)> = None;
    for (part_chunks, part_latency, start, end) in join(handles)? {
        chunks.extend(part_chunks);
        latency.merge(&part_latency);
        window = Some(window.map_or((start, end), |(s, e)| (s.min(start), e.max(end))));
    }
    let totals = map::merge(chunks);
    if totals.bytes() != info.region_bytes {
        return Err(RunError::Export(format!(
            "block status covered {} bytes of a {}-byte region",
            totals.bytes(),
            info.region_bytes
        )));
    }
    let seconds = window.map_or(0.0, |(s, e)| e.duration_since(s).as_secs_f64());
    Ok(MapReport { info, totals, seconds, latency })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_releases_everyone_with_one_start_time() {
        let gate = Arc::new(Gate::new(3));
        let abort = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (gate, abort) = (Arc::clone(&gate), Arc::clone(&abort));
                std::thread::spawn(move || gate.arrive(&abort))
            })
            .collect();
        let starts: Vec<_> = handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        assert!(starts.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn gate_gives_up_on_abort() {
        let gate = Gate::new(2);
        let abort = AtomicBool::new(true);
        assert_eq!(gate.arrive(&abort), None);
    }
}
