//! The worker set: spawning pinned workers, choosing one for each new
//! connection, and the control plane's way to reach all of them (freezing
//! an image's mutations while a checkpoint is cut).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use crate::engine::EngineError;
use crate::engine::buffers::{Budget, UNIT_BYTES};
use crate::engine::handoff::{NewConnection, WorkerHandle, WorkerMessage};
use crate::engine::metrics::WorkerSnapshot;
use crate::engine::worker::{Worker, WorkerParts};
use crate::net::accept::Dispatch;

use super::system::{eventfd, signal, system};
use super::{ServerConfig, ServerError};

/// How handshake threads reach a worker. Shared with every handshake thread
/// (which may outlive the accept thread), so it holds no join handles.
type WorkerTarget = WorkerHandle;

pub(super) struct Workers {
    /// Copies of the handles the workers have of each other.
    targets: Vec<WorkerTarget>,
    /// Use the SO_INCOMING_CPU hint (`--placement local`).
    local: bool,
}

impl Dispatch for Workers {
    /// Among the least-loaded workers (by connection count), the one pinned
    /// to the core the connection's packets arrive on. Waking a worker on
    /// another core costs an inter-processor interrupt: on the 2-vCPU test
    /// VM, QD1 4k reads took 61 µs at p50 with the worker on the other core
    /// and 21 µs on the same one. Balance still comes first.
    fn dispatch(&self, connection: NewConnection) {
        // One reading of the loads: they change under us (other handshakes
        // dispatch, workers close connections), and choosing by a second
        // reading could find no worker at the minimum of the first and drop
        // a connection that had just negotiated.
        let loads: Vec<usize> = self.targets.iter().map(|t| t.load.load(Ordering::Relaxed)).collect();
        let Some(&least) = loads.iter().min() else { return };
        let here = |t: &WorkerTarget| t.cpu.is_some() && t.cpu == connection.incoming_cpu;
        let at_least = || self.targets.iter().zip(&loads).filter(|&(_, &load)| load == least).map(|(t, _)| t);
        let local = at_least().filter(|_| self.local).find(|t| here(t));
        let target = local.or_else(|| at_least().next()).expect("some worker has the least load");
        target.load.fetch_add(1, Ordering::Relaxed);
        if target.sender.send(WorkerMessage::Connection(connection)).is_ok() {
            signal(&target.wake);
        }
    }
}

pub(super) type WorkerThread = JoinHandle<Result<(), EngineError>>;

pub(super) fn spawn_workers(
    config: &ServerConfig,
    shutdown: &Arc<AtomicBool>,
) -> Result<(Workers, Vec<WorkerThread>), ServerError> {
    // Shared by every worker: the limit is on the server, not per core.
    let request_bytes_max = config.worker.payload_bytes_max as usize + 2 * UNIT_BYTES;
    let budget = Arc::new(Budget::new(config.buffer_bytes, request_bytes_max));
    let cores = match (config.pin_workers, config.cpus.is_empty()) {
        (false, _) => Vec::new(),
        (true, true) => core_affinity::get_core_ids().unwrap_or_default(),
        (true, false) => config.cpus.iter().map(|&id| core_affinity::CoreId { id }).collect(),
    };
    let mut targets = Vec::with_capacity(config.threads);
    let mut threads = Vec::with_capacity(config.threads);
    let peers: crate::engine::worker::Peers = Arc::default();
    for index in 0..config.threads {
        let (sender, incoming) = crossbeam_channel::unbounded();
        let wake = eventfd()?;
        let load = Arc::new(AtomicUsize::new(0));
        let parts = WorkerParts {
            index,
            config: config.worker.clone(),
            incoming,
            wake_fd: Arc::clone(&wake),
            load: Arc::clone(&load),
            shutdown: Arc::clone(shutdown),
            budget: Arc::clone(&budget),
            cpu: (!cores.is_empty()).then(|| cores[index % cores.len()].id),
            peers: Arc::clone(&peers),
        };
        let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
        // The ring is created on its own thread (SINGLE_ISSUER); report
        // set-up failures back before the server claims to be up.
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("ringnbd-worker-{index}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                match Worker::new(parts) {
                    Ok(worker) => {
                        let _ = ready_tx.send(Ok(()));
                        worker.run()
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        Ok(())
                    }
                }
            })
            .map_err(system("spawn worker"))?;
        ready_rx.recv().expect("worker reports readiness")?;
        targets.push(WorkerTarget { sender, wake, load, cpu: core.map(|c| c.id) });
        threads.push(thread);
    }
    let handles = targets
        .iter()
        .map(|t| WorkerHandle {
            sender: t.sender.clone(),
            wake: Arc::clone(&t.wake),
            load: Arc::clone(&t.load),
            cpu: t.cpu,
        })
        .collect();
    let _ = peers.set(handles);
    Ok((Workers { targets, local: config.placement_local }, threads))
}

/// Why mutations of an image could not be frozen everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FreezeError {
    /// Some worker still had mutations in flight at the deadline.
    Timeout,
    /// A worker is shutting down.
    ShuttingDown,
}

impl Workers {
    fn send(&self, target: &WorkerTarget, message: WorkerMessage) -> bool {
        let sent = target.sender.send(message).is_ok();
        if sent {
            signal(&target.wake);
        }
        sent
    }

    /// Holds back new mutations of `image` on every worker and waits until
    /// none of them has one in flight. On failure every worker is thawed
    /// again before returning.
    pub(super) fn freeze(&self, image: usize, timeout: Duration) -> Result<(), FreezeError> {
        let deadline = Instant::now() + timeout;
        let mut acks = Vec::with_capacity(self.targets.len());
        for target in &self.targets {
            let (drained, ack) = crossbeam_channel::bounded(1);
            if !self.send(target, WorkerMessage::Freeze { image, drained }) {
                self.thaw(image);
                return Err(FreezeError::ShuttingDown);
            }
            acks.push(ack);
        }
        for ack in acks {
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = match ack.recv_timeout(left) {
                Ok(()) => continue,
                Err(RecvTimeoutError::Timeout) => FreezeError::Timeout,
                Err(RecvTimeoutError::Disconnected) => FreezeError::ShuttingDown,
            };
            self.thaw(image);
            return Err(outcome);
        }
        Ok(())
    }

    pub(super) fn thaw(&self, image: usize) {
        for target in &self.targets {
            self.send(target, WorkerMessage::Thaw { image });
        }
    }

    /// Closes every connection to `export` on every worker, as at shutdown.
    pub(super) fn close_export(&self, export: &Arc<crate::export::Export>) {
        for target in &self.targets {
            self.send(target, WorkerMessage::CloseExport { export: Arc::clone(export) });
        }
    }

    /// Wakes every worker (shutdown: they notice the flag).
    pub(super) fn wake_all(&self) {
        self.targets.iter().for_each(|t| signal(&t.wake));
    }

    /// Connections being served right now.
    pub(super) fn connections(&self) -> usize {
        self.targets.iter().map(|t| t.load.load(Ordering::Relaxed)).sum()
    }

    pub(super) fn count(&self) -> usize {
        self.targets.len()
    }

    /// A copy of every worker's request counters. A worker that does not
    /// answer within `timeout` (shutting down, or counting is off) is left
    /// out rather than holding up the reader.
    pub(super) fn snapshots(&self, timeout: Duration) -> Vec<WorkerSnapshot> {
        let deadline = Instant::now() + timeout;
        let replies: Vec<_> = self
            .targets
            .iter()
            .filter_map(|target| {
                let (reply, answer) = crossbeam_channel::bounded(1);
                self.send(target, WorkerMessage::Stats { reply }).then_some(answer)
            })
            .collect();
        replies
            .into_iter()
            .filter_map(|answer| answer.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok())
            .collect()
    }
}
