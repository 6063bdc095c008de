//! Connections arriving and leaving, shutdown, and housekeeping.
//!
//! A connection is released (its socket closed, its memory freed) only when
//! it is closing and the kernel holds none of its memory: no receive or send
//! in flight and no request outstanding. Every path that closes one goes
//! through `hard_close` or a graceful close followed by `release_if_idle`.

use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use io_uring::opcode;

use crate::export::Export;
use crate::proto::transmission::RequestLimits;

use super::super::conn::{CloseReason, Closing, Conn};
use super::super::handoff::{NewConnection, WorkerMessage};
use super::super::tls_transport::TlsTransport;
use super::super::user_data::Token;
use super::SPARE_RECEIVE_BUFFERS_MAX;
use super::{Worker, ZeroCopySends};

impl Worker {
    pub(super) fn on_wake(&mut self) {
        while let Ok(message) = self.incoming.try_recv() {
            match message {
                WorkerMessage::Connection(_) if self.draining => {
                    self.load.fetch_sub(1, Ordering::Relaxed);
                    // dropping the socket closes it
                }
                WorkerMessage::Connection(new) => self.adopt(new),
                WorkerMessage::Moved(moving) => self.adopt_moved(moving),
                control => self.on_control(control),
            }
        }
        while let Ok(done) = self.lookups.done.try_recv() {
            self.on_lookup(done);
        }
        if self.shutdown.load(Ordering::Acquire) && !self.draining {
            self.begin_drain();
        }
        // Kept posted while draining too: lookups in flight report through it.
        self.post_wake_read();
    }

    fn adopt(&mut self, new: NewConnection) {
        let n = new.negotiated;
        let export = new.export;
        let limits = RequestLimits {
            export_bytes: export.info.size,
            flags: n.flags,
            reply_mode: n.reply_mode,
            alignment_bytes: if n.block_size_agreed { export.info.block_size.minimum } else { 1 },
            payload_bytes_max: self.config.payload_bytes_max,
            has_contexts: !new.contexts.is_empty(),
        };
        let framing = format!("{:?}", n.reply_mode);
        crate::log::event(
            "connection-open",
            &[
                ("worker", json!(self.index)),
                ("peer", json!(new.peer)),
                ("export", json!(export.info.name)),
                ("framing", json!(framing)),
                ("tls", json!(new.tls.is_some())),
            ],
            &format!(
                "worker {}: {} on export {:?} ({framing}{})",
                self.index,
                new.peer,
                export.info.name,
                if new.tls.is_some() { ", TLS" } else { "" }
            ),
        );
        let conn = Conn::new(
            new.socket,
            new.peer,
            export,
            limits,
            new.contexts,
            self.config.inflight_per_conn_max,
            self.now,
            self.spare_receive_buffers.pop().unwrap_or_default(),
        );
        let mut conn = Box::new(conn);
        conn.tls = new.tls.map(|parts| Box::new(TlsTransport::new(parts)));
        // TLS encrypts every reply into a buffer of its own.
        conn.zero_copy = self.config.zero_copy_sends != ZeroCopySends::Off && conn.tls.is_none() && new.tcp;
        conn.slot = new.slot;
        conn.incoming_cpu = new.incoming_cpu;
        if !new.home_measured {
            conn.home = super::Home::Guessed;
        }
        if let Some(counters) = &mut self.counters {
            conn.counters_slot = counters.slot(&conn.export.info.name);
            counters.connection_opened(conn.counters_slot);
        }
        self.serve(conn);
    }

    /// Starts serving a connection that arrived (new, or moved here).
    pub(super) fn serve(&mut self, conn: Box<Conn>) {
        let forced = conn.export.usage.is_forced();
        let id = self.conns.insert(conn) as u32;
        self.arm_housekeeping();
        if self.draining {
            return self.close_gracefully(id, CloseReason::Shutdown);
        }
        if forced {
            // Its export was removed with --force while it was on its way
            // here, after this worker closed the export's other connections.
            return self.close_gracefully(id, CloseReason::ExportRemoved);
        }
        self.pump(id);
    }

    /// Shutdown: stop reading new requests everywhere; in-flight requests
    /// finish and their replies are sent before each connection closes. A
    /// WRITE whose payload is still arriving keeps receiving it, so the
    /// write is not lost; the drain deadline bounds how long that may take.
    fn begin_drain(&mut self) {
        self.draining = true;
        // Held mutations run now: shutdown waits for them like for any
        // other, and a checkpoint being cut gives up (see `on_control`).
        self.thaw_all();
        let deadline = opcode::Timeout::new(&*self.drain_deadline).build().user_data(Token::DrainDeadline.encode());
        self.push(deadline);
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.close_gracefully(id as u32, CloseReason::Shutdown);
        }
    }

    /// Stops reading new requests on a connection; the ones it has finish
    /// and are answered before it closes (a WRITE payload still arriving
    /// is received, so the write is not lost).
    pub(super) fn close_gracefully(&mut self, id: u32, reason: CloseReason) {
        let conn = &mut self.conns[id as usize];
        if conn.closing == Closing::Open {
            conn.closing = Closing::Graceful;
            conn.closing_because(reason);
        }
        // A receive waiting for a header is cancelled.
        if conn.recv_in_flight && conn.payload_request.is_none() {
            let target = Token::Recv { conn: id }.encode();
            self.push(opcode::AsyncCancel::new(target).build().user_data(Token::Cancel.encode()));
        }
        self.release_if_idle(id);
    }

    /// An export removed with `--force`: its connections here close as at
    /// shutdown, and the stall timeout bounds how long they may take.
    pub(super) fn close_export(&mut self, export: &Arc<Export>) {
        let ids: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| Arc::ptr_eq(c.export.export(), export))
            .map(|(id, _)| id as u32)
            .collect();
        for id in ids {
            self.close_gracefully(id, CloseReason::ExportRemoved);
        }
    }

    /// Shutdown took too long: drop every connection still open. Their
    /// in-flight operations complete (with errors) and free them.
    pub(super) fn drain_expired(&mut self) {
        self.drain_deadline_passed = true;
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        if !ids.is_empty() && self.config.verbose {
            crate::note!(
                "worker {}: dropping {} connection(s) still busy at the drain deadline",
                self.index,
                ids.len()
            );
        }
        for id in ids {
            if self.conns.contains(id) && self.conns[id].closing != Closing::Hard {
                self.conns[id].close_reason = Some(CloseReason::DrainDeadline);
                self.hard_close(id as u32);
            }
        }
    }

    /// Drops a connection: the socket is shut down so operations in flight on
    /// it complete, and everything not owned by the kernel is freed now; the
    /// rest is freed as its completions arrive.
    pub(super) fn hard_close(&mut self, id: u32) {
        let conn = &mut self.conns[id as usize];
        conn.closing = Closing::Hard;
        if conn.send_in_flight || !conn.send_queue.is_empty() {
            // Replies are being abandoned: reset instead of queueing a FIN
            // behind data a client that stopped reading will never take.
            abort_on_close(conn.fd());
        }
        // SAFETY: shutdown on an fd this connection owns; it makes any receive
        // or send in flight complete so the slot can be released.
        unsafe { libc::shutdown(conn.fd(), libc::SHUT_RDWR) };
        if !conn.recv_in_flight
            && let Some(request) = conn.payload_request.take()
        {
            self.free_request(request);
        }
        if !self.conns[id as usize].send_in_flight {
            self.drop_queued_replies(id);
        }
        self.release_if_idle(id);
    }

    pub(super) fn drop_queued_replies(&mut self, id: u32) {
        while let Some(request) = self.conns[id as usize].send_queue.pop_front() {
            self.free_request(request);
        }
    }

    /// Frees a closing connection once the kernel holds none of its memory.
    pub(super) fn release_if_idle(&mut self, id: u32) {
        if Self::ready_to_move(&self.conns[id as usize]) {
            return self.move_out(id);
        }
        let conn = &mut self.conns[id as usize];
        let idle = !conn.recv_in_flight && !conn.send_in_flight && conn.inflight == 0;
        // A TLS connection closing cleanly says so (close_notify) before its
        // socket closes, so the client can tell the end from a truncation.
        if conn.closing == Closing::Graceful
            && idle
            && let Some(tls) = conn.tls.as_mut()
            && tls.queue_close_notify()
        {
            self.flush_send(id);
            if self.conns[id as usize].send_in_flight {
                return;
            }
        }
        let conn = &self.conns[id as usize];
        let idle = !conn.recv_in_flight && !conn.send_in_flight && conn.inflight == 0;
        if conn.closing != Closing::Open && idle {
            debug_assert!(conn.payload_request.is_none() && conn.send_queue.is_empty());
            let conn = self.conns.remove(id as usize); // closes the socket
            let reason = conn.close_reason.as_ref().map_or("closed".to_owned(), |r| r.to_string());
            let seconds = self.now.saturating_duration_since(conn.opened_at).as_secs_f64();
            crate::log::event(
                "connection-close",
                &[
                    ("worker", json!(self.index)),
                    ("peer", json!(conn.peer)),
                    ("export", json!(conn.export.info.name)),
                    ("duration_s", json!((seconds * 1000.0).round() / 1000.0)),
                    ("requests", json!(conn.requests_seen)),
                    ("bytes_read", json!(conn.bytes_read)),
                    ("bytes_written", json!(conn.bytes_written)),
                    ("reason", json!(reason)),
                ],
                &format!(
                    "worker {}: {} on export {:?} disconnected after {seconds:.1} s, {} request(s), {} bytes read, \
                     {} written: {reason}",
                    self.index,
                    conn.peer,
                    conn.export.info.name,
                    conn.requests_seen,
                    conn.bytes_read,
                    conn.bytes_written
                ),
            );
            self.stalled.retain(|&s| s != id);
            let receive = conn.into_receive_buffer();
            if self.spare_receive_buffers.len() < SPARE_RECEIVE_BUFFERS_MAX {
                self.spare_receive_buffers.push(receive);
            }
            self.load.fetch_sub(1, Ordering::Relaxed);
            self.released_since_trim += 1;
        }
    }

    pub(super) fn arm_housekeeping(&mut self) {
        if self.housekeeping_armed {
            return;
        }
        self.housekeeping_armed = true;
        let entry = opcode::Timeout::new(&*self.housekeeping_period).build().user_data(Token::Housekeeping.encode());
        self.push(entry);
    }

    /// Runs about once a second while there is anything to watch: drops
    /// connections that have waited on their client longer than the stall
    /// timeout, and returns idle buffer memory.
    pub(super) fn housekeeping(&mut self) {
        self.housekeeping_armed = false;
        let (now, timeout) = (self.now, self.config.stall_timeout);
        let expired: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.closing != Closing::Hard && c.waits_on_client())
            .filter(|(_, c)| now.saturating_duration_since(c.last_progress) > timeout)
            .map(|(id, _)| id as u32)
            .collect();
        for id in expired {
            let conn = &mut self.conns[id as usize];
            conn.closing_because(CloseReason::StallTimeout);
            crate::note!(
                "worker {}: dropping {} on export {:?}: no progress from the client for {:.1} s \
                 (--stall-timeout) while it holds {} request(s) and {} KiB of buffers",
                self.index,
                conn.peer,
                conn.export.info.name,
                timeout.as_secs_f64(),
                conn.inflight,
                conn.buffer_bytes / 1024
            );
            self.hard_close(id);
        }
        for (_, conn) in self.conns.iter_mut() {
            if !conn.send_in_flight
                && conn.send_queue.is_empty()
                && let Some(tls) = conn.tls.as_mut()
            {
                tls.trim();
            }
        }
        let Worker { pool, ring, .. } = self;
        let holds_memory = pool.housekeeping(ring);
        if self.released_since_trim >= TRIM_AFTER_RELEASES {
            self.released_since_trim = 0;
            return_free_heap();
        }
        if !self.conns.is_empty() || holds_memory {
            self.arm_housekeeping();
        }
    }
}

/// Closed connections after which the heap's free memory is handed back.
const TRIM_AFTER_RELEASES: usize = 32;

/// Connection state is small heap allocations made by many threads; glibc
/// keeps what they free in its arenas. After a wave of connections has gone,
/// give the free pages back so the server's footprint follows its load.
fn return_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// SO_LINGER with a zero timeout: closing the socket sends a reset and
/// drops unsent data instead of keeping it in the kernel.
fn abort_on_close(fd: std::os::fd::RawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket this connection owns, with a correctly
    // sized struct; failure only means a graceful close instead.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
