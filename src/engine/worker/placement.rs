//! Where a connection is served, after its handshake placed it.
//!
//! With `--placement local` (the default) a connection starts on the
//! worker pinned to the core its packets arrive on: on loopback that is
//! the client's own core, which is what a latency-bound client wants (no
//! cross-core wake-up per request: 21 µs instead of 61 µs at p50 for 4k
//! QD1 on the 2-vCPU test VM). A client that streams large transfers wants
//! the opposite: sharing a core with the server halves what either can do.
//! So every [`WINDOW`] the worker looks at what the connection moved. One
//! that streams (requests of [`STREAM_REQUEST_BYTES_MIN`] on average, at
//! [`STREAM_BYTES_PER_S_MIN`] or more) moves to the least-loaded worker on
//! another core; one that is latency-bound again moves back to its home
//! core's worker. A move happens only towards a worker with fewer
//! connections than this one, so two streams from two cores never trade
//! places back and forth.
//!
//! A Unix socket has no incoming core. Its home is guessed from the core
//! the handshake ended on, which is often not the client's: the handshake
//! thread runs wherever the scheduler found room, and a client pinned to
//! one core never meets it there (4k QD1 then ran at 22k instead of 88k
//! IOPS on the 2-vCPU test VM). So the first latency-bound window of a
//! connection with a guessed home measures its request rate and moves it
//! to a worker on another core for one window ([`Home::Trying`]); the
//! connection stays where it ran faster, and that core becomes its home.
//!
//! Moving: the connection stops parsing, its header receive is cancelled,
//! and once nothing of it is in flight (no receive, no send, no request)
//! the whole connection, unparsed bytes included, goes to the other worker
//! through its channel. A TLS connection moves the same way, its session
//! and any partial record it holds included: encryption is the bulk of its
//! work, so it gains most from a core of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::opcode;

use super::super::conn::{Closing, Conn};
use super::super::handoff::{MovingConn, WorkerMessage};
use super::super::user_data::Token;
use super::Worker;

/// How often a connection's traffic is judged.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Average request size above which a busy connection counts as streaming.
pub const STREAM_REQUEST_BYTES_MIN: u64 = 64 << 10;
/// Traffic above which a connection of large requests counts as streaming.
pub const STREAM_BYTES_PER_S_MIN: u64 = 256 << 20;
/// Average request size below which a connection is latency-bound.
pub const LATENCY_REQUEST_BYTES_MAX: u64 = 32 << 10;

/// A latency-bound connection that runs at least this fraction of the
/// request rate it had before a trial move stays on the tried core.
pub const TRIAL_KEEP_RATIO: f64 = 0.9;

/// How sure placement is of a connection's home core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Home {
    /// Measured (SO_INCOMING_CPU), settled by a trial, or not worth one.
    Known,
    /// Guessed from where the handshake ended (Unix sockets).
    Guessed,
    /// Moved here from worker `from` to try this core; it ran `rate`
    /// requests per second there.
    Trying { from: usize, rate: f64 },
}

/// What a connection moved in the current window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub bytes: u64,
    pub requests: u64,
}

impl Window {
    pub fn new(now: Instant) -> Self {
        Self { start: now, bytes: 0, requests: 0 }
    }
}

/// What a window says about a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    Streaming,
    LatencyBound,
    /// Neither clearly (or too little to tell): stay.
    Unclear,
}

pub fn judge(window: &Window, elapsed: Duration) -> Traffic {
    if window.requests == 0 {
        return Traffic::Unclear;
    }
    let average = window.bytes / window.requests;
    let rate = (window.bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64;
    if average >= STREAM_REQUEST_BYTES_MIN && rate >= STREAM_BYTES_PER_S_MIN {
        Traffic::Streaming
    } else if average < LATENCY_REQUEST_BYTES_MAX {
        Traffic::LatencyBound
    } else {
        Traffic::Unclear
    }
}

impl Worker {
    /// Counts a request's payload in its connection's window and, once a
    /// window is over, decides whether the connection should move.
    pub(super) fn count_for_placement(&mut self, id: u32, bytes: u64) {
        let now = self.now;
        let conn = &mut self.conns[id as usize];
        conn.window.bytes += bytes;
        conn.window.requests += 1;
        let elapsed = now.saturating_duration_since(conn.window.start);
        if elapsed < WINDOW {
            return;
        }
        let traffic = judge(&conn.window, elapsed);
        let rate = conn.window.requests as f64 / elapsed.as_secs_f64();
        conn.window = Window::new(now);
        if !self.config.move_connections || conn.moving_to.is_some() {
            return;
        }
        if self.settle_home(id, traffic, rate) {
            return;
        }
        if let Some(target) = self.better_worker(&self.conns[id as usize], traffic) {
            self.begin_move(id, target, traffic);
        }
    }

    /// Runs the trial of a guessed home (see the module's comment); true
    /// when it moved the connection.
    fn settle_home(&mut self, id: u32, traffic: Traffic, rate: f64) -> bool {
        let conn = &self.conns[id as usize];
        let home = conn.home;
        if traffic != Traffic::LatencyBound {
            // Only a latency-bound rate says anything about wake-ups.
            if matches!(home, Home::Trying { .. }) {
                self.conns[id as usize].home = Home::Known;
            }
            return false;
        }
        match home {
            Home::Known => false,
            // Away from its guessed home (it streamed), it goes home first.
            Home::Guessed if conn.incoming_cpu != self.cpu => false,
            Home::Guessed => {
                let Some(target) = self.trial_worker() else {
                    self.conns[id as usize].home = Home::Known;
                    return false;
                };
                self.conns[id as usize].home = Home::Trying { from: self.index, rate };
                self.begin_move(id, target, traffic);
                true
            }
            Home::Trying { from, rate: before } => {
                let conn = &mut self.conns[id as usize];
                conn.home = Home::Known;
                if rate >= before * TRIAL_KEEP_RATIO {
                    conn.incoming_cpu = self.cpu;
                } else if let Some(peers) = self.peers.get() {
                    // Back to where it ran faster (`better_worker` moves it).
                    conn.incoming_cpu = peers[from].cpu;
                }
                if self.config.verbose {
                    let home = conn.incoming_cpu.map_or_else(|| "unknown".to_owned(), |cpu| cpu.to_string());
                    crate::note!(
                        "worker {}: {} ran {rate:.0} requests/s here, {before:.0} on worker {from}: its home is core {home}",
                        self.index,
                        conn.peer,
                    );
                }
                false
            }
        }
    }

    /// A worker on another core, with no more connections than this one,
    /// to try a guessed home against.
    fn trial_worker(&self) -> Option<usize> {
        let peers = self.peers.get()?;
        let mine = peers[self.index].load.load(Ordering::Relaxed);
        peers
            .iter()
            .enumerate()
            .filter(|(index, p)| *index != self.index && p.cpu.is_some() && p.cpu != self.cpu)
            .filter(|(_, p)| p.load.load(Ordering::Relaxed) <= mine)
            .min_by_key(|(_, p)| p.load.load(Ordering::Relaxed))
            .map(|(index, _)| index)
    }

    /// The worker `conn` should be on, if it is not this one and that one
    /// has fewer connections.
    fn better_worker(&self, conn: &Conn, traffic: Traffic) -> Option<usize> {
        let peers = self.peers.get()?;
        let home = conn.incoming_cpu?;
        let mine = peers[self.index].load.load(Ordering::Relaxed);
        let fewer = |(_, p): &(usize, &super::super::handoff::WorkerHandle)| p.load.load(Ordering::Relaxed) < mine;
        let at_home = self.cpu == Some(home);
        let candidates = peers.iter().enumerate().filter(|(index, _)| *index != self.index);
        match traffic {
            Traffic::Streaming if at_home => candidates
                .filter(|(_, p)| p.cpu.is_some() && p.cpu != Some(home))
                .filter(fewer)
                .min_by_key(|(_, p)| p.load.load(Ordering::Relaxed))
                .map(|(index, _)| index),
            Traffic::LatencyBound if !at_home => {
                candidates.filter(|(_, p)| p.cpu == Some(home)).find(fewer).map(|(index, _)| index)
            }
            _ => None,
        }
    }

    /// Stops parsing on the connection and cancels its header receive; it
    /// leaves once idle (see `release_if_idle`).
    fn begin_move(&mut self, id: u32, target: usize, traffic: Traffic) {
        let conn = &mut self.conns[id as usize];
        conn.moving_to = Some(target);
        if self.config.verbose {
            crate::note!(
                "worker {}: moving {} to worker {target} ({})",
                self.index,
                conn.peer,
                match (traffic, conn.home) {
                    (Traffic::Streaming, _) => "it streams",
                    (_, Home::Trying { .. }) => "to try its core",
                    _ => "it is latency-bound again",
                }
            );
        }
        if conn.recv_in_flight && conn.payload_request.is_none() {
            let target = Token::Recv { conn: id }.encode();
            self.push(opcode::AsyncCancel::new(target).build().user_data(Token::Cancel.encode()));
        }
        self.release_if_idle(id);
    }

    /// Whether the connection is moving and nothing of it is in flight (a
    /// request counts in `inflight` from its header until its reply is
    /// sent, a WRITE payload still arriving and a queued reply included).
    pub(super) fn ready_to_move(conn: &Conn) -> bool {
        conn.moving_to.is_some()
            && conn.closing == Closing::Open
            && !conn.recv_in_flight
            && !conn.send_in_flight
            && conn.inflight == 0
    }

    /// Hands an idle moving connection to its new worker.
    pub(super) fn move_out(&mut self, id: u32) {
        let mut conn = self.conns.remove(id as usize);
        self.stalled.retain(|&s| s != id);
        let target = conn.moving_to.take().expect("only moving connections move");
        conn.stalled = None;
        let peer = &self.peers.get().expect("a move target comes from the peers")[target];
        peer.load.fetch_add(1, Ordering::Relaxed);
        self.load.fetch_sub(1, Ordering::Relaxed);
        if peer.sender.send(WorkerMessage::Moved(MovingConn(conn))).is_ok() {
            crate::engine::handoff::signal_eventfd(&peer.wake);
        } else {
            // The other worker is gone (shutdown): the connection closes.
            peer.load.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A connection another worker moved here.
    pub(super) fn adopt_moved(&mut self, moving: MovingConn) {
        let mut conn = moving.0;
        conn.window = Window::new(self.now);
        conn.last_progress = self.now;
        if let Some(counters) = &mut self.counters {
            conn.counters_slot = counters.slot(&conn.export.info.name);
        }
        self.serve(conn);
    }
}

/// Peers of every worker, set once they all exist.
pub type Peers = Arc<std::sync::OnceLock<Vec<super::super::handoff::WorkerHandle>>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn window(bytes: u64, requests: u64) -> Window {
        Window { start: Instant::now(), bytes, requests }
    }

    #[test]
    fn large_busy_traffic_streams_and_small_requests_are_latency_bound() {
        let second = Duration::from_secs(1);
        assert_eq!(judge(&window(1 << 30, 1024), second), Traffic::Streaming, "1 GiB/s of 1 MiB");
        assert_eq!(judge(&window(64 << 20, 64), second), Traffic::Unclear, "1 MiB requests, but only 64 MiB/s");
        assert_eq!(judge(&window(400 << 20, 100_000), second), Traffic::LatencyBound, "4k requests, however many");
        assert_eq!(judge(&window(0, 0), second), Traffic::Unclear);
        assert_eq!(judge(&window(48 << 20, 1024), Duration::from_millis(100)), Traffic::Unclear, "48k requests");
    }
}
