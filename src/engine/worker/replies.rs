//! Replies: encoding them into each request's inline bytes and buffer, the
//! per-connection send queue drained by one gathered `sendmsg` at a time,
//! and freeing requests once their reply is on the wire.

use std::time::Instant;

use io_uring::{opcode, types};

use crate::proto::reply;
use crate::proto::transmission::{Command, ReplyMode};

use super::super::conn::{CloseReason, Closing, Conn, SendPlan};
use super::super::pipes;
use super::super::request::Request;
use super::super::sparse_read::{self, Run};
use super::super::user_data::Token;
use super::super::{metrics, write_path};
use super::{Worker, ZeroCopySends};

/// READ replies of at least this much data go zero-copy (when they do at
/// all): below it, pinning pages and waiting for a notification cost more
/// than the copy saves, and the 4k paths stay exactly as measured.
pub const ZERO_COPY_BYTES_MIN: usize = 64 << 10;
/// `IORING_SEND_ZC_REPORT_USAGE` (Linux 6.2): the notification says
/// whether the kernel had to copy after all.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's result.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

impl Worker {
    /// Encodes the reply and queues it on its connection.
    pub(super) fn finish(&mut self, request: u32, is_read: bool) {
        let Worker { requests, conns, counters, config, index, .. } = self;
        let req = &mut requests[request as usize];
        let conn = &mut conns[req.conn as usize];
        debug_assert!(!req.task.is_waiting() && req.status.scans_pending == 0);
        debug_assert!(!req.task.holds_locks(), "block locks are released before the reply");
        let to = req.to;
        match (req.error, req.command) {
            (Some(error), _) => {
                req.clear_reply();
                req.reply_inline(|out| reply::error(out, to, error.code.code(), error.message));
            }
            (None, Command::Read { offset, length, df }) if is_read => {
                compose_read(req, offset, length, df);
                if req.buffer.is_some() && length as usize >= ZERO_COPY_BYTES_MIN {
                    req.zero_copy = true;
                    req.conn_serial = conn.serial;
                }
            }
            (None, Command::BlockStatus { .. }) => {} // encoded into the buffer already
            (None, _) => req.reply_inline(|out| reply::success(out, to, is_read)),
        }
        write_path::complete(&conn.export.image, &req.command, req.error.is_none());
        match (req.error, req.command) {
            (None, Command::Read { length, .. }) => conn.bytes_read += u64::from(length),
            (None, Command::Write { length, .. }) => conn.bytes_written += u64::from(length),
            (Some(error), _) if config.verbose => log_error_reply(*index, conn, req.kind, error),
            _ => {}
        }
        if let Some(counters) = counters {
            let bytes = metrics::covered_bytes(&req.command);
            // A clock read of its own: a request that arrives and is answered
            // in one ring turn (memory, the page cache) would otherwise
            // always measure zero.
            let now = Instant::now();
            counters.request_done(conn.counters_slot, req.kind, bytes, req.error.map(|e| e.code), req.started, now);
        }
        let id = req.conn;
        if std::mem::take(&mut req.gated) {
            let image = conn.export.image.id;
            self.leave_gate(image);
        }
        let (conn, now) = (&mut self.conns[id as usize], self.now);
        if conn.closing == Closing::Hard {
            self.free_request(request);
            return self.release_if_idle(id);
        }
        if conn.send_queue.is_empty() && !conn.send_in_flight {
            // From here on the connection waits on its client to read.
            conn.last_progress = now;
        }
        conn.send_queue.push_back(request);
        let bytes = self.requests[request as usize].client_len() as u64;
        self.flush_send(id);
        if self.conns.contains(id as usize) {
            self.count_for_placement(id, bytes);
        }
    }

    /// Starts sending what is queued: gathered bytes through the ring, a
    /// spliced read's pipe inline (a non-blocking splice per step, and a
    /// poll for room when the socket is full). May release the connection
    /// when inline sends finish a closing one's last reply, so callers
    /// check it still exists.
    pub(super) fn flush_send(&mut self, id: u32) {
        let mut spliced = false;
        loop {
            let conn = &mut self.conns[id as usize];
            if conn.send_in_flight || conn.closing == Closing::Hard {
                break;
            }
            if conn.tls.is_some() {
                return self.flush_tls_send(id);
            }
            match conn.plan_send(&self.requests) {
                None => break,
                Some(SendPlan::Gather { message, more }) => {
                    conn.send_in_flight = true;
                    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
                    let entry = opcode::SendMsg::new(types::Fd(conn.fd()), message)
                        .flags(flags as u32)
                        .build()
                        .user_data(Token::Send { conn: id }.encode());
                    self.push(entry);
                    break;
                }
                Some(SendPlan::ZeroCopy { request, at, len, more }) => {
                    conn.send_in_flight = true;
                    let req = &mut self.requests[request as usize];
                    req.zc_notifs += 1;
                    let fixed = req.buffer.as_ref().and_then(|b| b.fixed_index());
                    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
                    // The buffer is the request's until the notification
                    // (`on_send_zc`), and `free_request` keeps it that long.
                    let entry = opcode::SendZc::new(types::Fd(conn.fd()), at, len as u32)
                        .buf_index(fixed)
                        .flags(flags)
                        .zc_flags(SEND_ZC_REPORT_USAGE)
                        .build()
                        .user_data(Token::SendZc { request }.encode());
                    self.push(entry);
                    break;
                }
                Some(SendPlan::Pipe { request, len, more }) => {
                    let pipe = self.requests[request as usize].pipe.as_ref().expect("pipe segments have a pipe");
                    match pipes::drain(pipe, conn.fd(), len, more) {
                        Ok(sent) if sent > 0 => {
                            spliced = true;
                            conn.last_progress = self.now;
                            self.account_sent(id, sent);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            conn.send_in_flight = true;
                            let entry = opcode::PollAdd::new(types::Fd(conn.fd()), libc::POLLOUT as u32)
                                .build()
                                .user_data(Token::Writable { conn: id }.encode());
                            self.push(entry);
                            break;
                        }
                        outcome => {
                            let errno = outcome.err().and_then(|e| e.raw_os_error()).unwrap_or(0);
                            conn.closing_because(CloseReason::SendFailed(errno));
                            return self.hard_close(id);
                        }
                    }
                }
            }
        }
        if spliced {
            self.release_if_idle(id);
        }
    }

    /// The socket has room again for a pipe's bytes (or failed).
    pub(super) fn on_writable(&mut self, id: u32, result: i32) {
        let conn = &mut self.conns[id as usize];
        conn.send_in_flight = false;
        if result < 0 || conn.closing == Closing::Hard {
            if conn.closing != Closing::Hard {
                conn.closing_because(CloseReason::SendFailed(-result));
                return self.hard_close(id);
            }
            self.drop_queued_replies(id);
            return self.release_if_idle(id);
        }
        self.flush_send(id);
        if self.conns.contains(id as usize) {
            self.release_if_idle(id);
        }
    }

    /// `sent` bytes of the queue are on the wire: frees the replies done.
    fn account_sent(&mut self, id: u32, sent: usize) {
        let done = self.conns[id as usize].sent(sent, &self.requests);
        for _ in 0..done {
            let request = self.conns[id as usize].send_queue.pop_front().expect("counted by sent()");
            self.free_request(request);
        }
    }

    /// Encrypts what a plain send would gather and sends the ciphertext.
    fn flush_tls_send(&mut self, id: u32) {
        let conn = &mut self.conns[id as usize];
        let mut tls = conn.tls.take().expect("a TLS connection");
        let staged = tls.stage(conn.unsent(&self.requests));
        conn.tls = Some(tls);
        match staged {
            Ok(None) => {}
            Ok(Some((bytes, len))) => {
                conn.send_in_flight = true;
                let entry = opcode::Send::new(types::Fd(conn.fd()), bytes, len.min(u32::MAX as usize) as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(Token::Send { conn: id }.encode());
                self.push(entry);
            }
            Err(e) => {
                conn.closing_because(CloseReason::ProtocolViolation(e.to_string()));
                self.hard_close(id);
            }
        }
    }

    pub(super) fn on_send(&mut self, id: u32, result: i32) {
        let conn = &mut self.conns[id as usize];
        conn.send_in_flight = false;
        // A zero-byte send of a non-empty message means the socket is dead.
        if result <= 0 || conn.closing == Closing::Hard {
            if conn.closing != Closing::Hard {
                conn.closing_because(CloseReason::SendFailed(-result));
                return self.hard_close(id);
            }
            self.drop_queued_replies(id);
            return self.release_if_idle(id);
        }
        conn.last_progress = self.now;
        let sent = match conn.tls.as_mut() {
            None => result as usize,
            Some(tls) => match tls.sent(result as usize) {
                Some(plaintext) => plaintext,
                // The rest of the ciphertext goes first.
                None => return self.flush_send(id),
            },
        };
        self.account_sent(id, sent);
        self.flush_send(id);
        if self.conns.contains(id as usize) {
            self.release_if_idle(id);
        }
    }

    /// A zero-copy send's completion: first its result, as for any send
    /// (with IORING_CQE_F_MORE when a notification follows), then the
    /// notification that the kernel no longer reads the buffer.
    pub(super) fn on_send_zc(&mut self, request: u32, result: i32, flags: u32) {
        let req = &mut self.requests[request as usize];
        if io_uring::cqueue::notif(flags) {
            req.zc_notifs -= 1;
            if (result as u32) & NOTIF_USAGE_ZC_COPIED != 0 && self.config.zero_copy_sends == ZeroCopySends::Auto {
                self.zero_copy_copied(request);
            }
            let req = &self.requests[request as usize];
            if req.retired && req.zc_notifs == 0 {
                self.release_retired(request);
            }
            return;
        }
        let id = req.conn;
        if !io_uring::cqueue::more(flags) {
            // Refused before it took the buffer: no notification comes.
            req.zc_notifs -= 1;
        }
        let conn = &mut self.conns[id as usize];
        if result < 0 && conn.closing != Closing::Hard {
            // Nothing was sent. Where zero-copy itself is refused (a socket
            // without it, EOPNOTSUPP; pinned pages over RLIMIT_MEMLOCK,
            // ENOBUFS) the connection copies from now on; a dead socket
            // fails that send too and closes as usual.
            conn.send_in_flight = false;
            conn.zero_copy = false;
            if self.config.verbose {
                let error = std::io::Error::from_raw_os_error(-result);
                crate::note!(
                    "worker {}: {}: zero-copy send refused ({error}); sending with a copy",
                    self.index,
                    conn.peer
                );
            }
            self.flush_send(id);
            if self.conns.contains(id as usize) {
                self.release_if_idle(id);
            }
            return;
        }
        self.on_send(id, result);
    }

    /// The kernel copied a zero-copy send after all (the peer is on this
    /// host): pinning and notifying cost more than a plain send's copy, so
    /// the connection that sent it copies from now on.
    fn zero_copy_copied(&mut self, request: u32) {
        let req = &self.requests[request as usize];
        let serial = req.conn_serial;
        let Some(conn) = self.conns.get_mut(req.conn as usize).filter(|c| c.serial == serial) else {
            return; // closed or moved on since
        };
        if std::mem::take(&mut conn.zero_copy) && self.config.verbose {
            crate::note!(
                "worker {}: {}: the kernel copies zero-copy sends to this peer; sending with a copy",
                self.index,
                conn.peer
            );
        }
    }

    /// Returns a request's slot and buffer, and notes that stalled
    /// connections may now get theirs. Never releases the connection:
    /// callers may still be using it, and call `release_if_idle`.
    ///
    /// A request whose buffer a zero-copy send may still be reading is
    /// retired instead: its connection lets go of it now (it no longer
    /// counts in flight, so the connection may close or move), and the
    /// slot and buffer wait for the last notification (`release_retired`).
    pub(super) fn free_request(&mut self, request: u32) {
        let req = &mut self.requests[request as usize];
        if req.zc_notifs > 0 {
            debug_assert!(!req.retired, "a request is retired once");
            req.retired = true;
            let held = req.buffer.as_ref().map_or(0, |b| b.len());
            let conn = self.conns.get_mut(req.conn as usize).expect("a connection outlives its requests");
            conn.inflight -= 1;
            conn.buffer_bytes -= held;
            self.zero_copy_retired += 1;
            return;
        }
        let req = self.requests.remove(request as usize);
        debug_assert!(!req.task.holds_locks(), "a request is freed only after its backend work");
        let conn = self.conns.get_mut(req.conn as usize).expect("a connection outlives its requests");
        conn.inflight -= 1;
        if let Some(buffer) = req.buffer {
            conn.buffer_bytes -= buffer.len();
            self.pool.free(buffer);
        }
        if let Some(pipe) = req.pipe {
            self.pipes.give(pipe);
        }
        self.freed = true;
    }

    /// A retired request's last notification came: the kernel is done
    /// with its buffer.
    fn release_retired(&mut self, request: u32) {
        let req = self.requests.remove(request as usize);
        if let Some(buffer) = req.buffer {
            self.pool.free(buffer);
        }
        self.zero_copy_retired -= 1;
        self.freed = true;
    }
}

/// A successful READ's reply: one data chunk (simple mode, DF, or no zero
/// runs), else OFFSET_DATA and OFFSET_HOLE chunks (see `sparse_read`).
fn compose_read(req: &mut Request, offset: u64, length: u32, df: bool) {
    if req.pipe.is_some() || req.mapped.is_some() {
        let to = req.to;
        if req.hole {
            return req.reply_inline(|out| reply::hole_chunk(out, to, offset, length, true));
        }
        req.reply_inline(|out| reply::read_data(out, to, offset, length));
        return match req.mapped {
            Some(at) => req.reply_mapped(at, length as usize),
            None => req.reply_pipe(length as usize),
        };
    }
    let (to, head, len) = (req.to, req.task.span.head, length as usize);
    let mut runs = [Run { hole: false, start: 0, len: 0 }; sparse_read::CHUNKS_MAX];
    let count = if to.mode == ReplyMode::Simple || df {
        0
    } else {
        let data = &req.buffer.as_ref().expect("reads own a buffer")[head..head + len];
        sparse_read::runs(data, offset, &mut runs)
    };
    if count <= 1 && !runs[0].hole {
        req.reply_inline(|out| reply::read_data(out, to, offset, length));
        return req.reply_buffer(head, len);
    }
    for (index, run) in runs[..count].iter().enumerate() {
        let done = index + 1 == count;
        let at = offset + run.start as u64;
        if run.hole {
            req.reply_inline(|out| reply::hole_chunk(out, to, at, run.len as u32, done));
        } else {
            req.reply_inline(|out| reply::data_chunk(out, to, at, run.len as u32, done));
            req.reply_buffer(head + run.start, run.len);
        }
    }
}

/// `-v`: one line per error reply, with what was asked and why it failed.
fn log_error_reply(worker: usize, conn: &Conn, kind: u16, error: crate::proto::Failure) {
    let command = metrics::command_index(kind).map_or("request", |i| metrics::COMMANDS[i]);
    let code = error.code.name();
    crate::log::event(
        "error-reply",
        &[
            ("worker", serde_json::json!(worker)),
            ("peer", serde_json::json!(conn.peer)),
            ("export", serde_json::json!(conn.export.info.name)),
            ("command", serde_json::json!(command)),
            ("error", serde_json::json!(code)),
            ("reason", serde_json::json!(error.message)),
        ],
        &format!(
            "worker {worker}: {} on export {:?}: {command} failed: {code} ({})",
            conn.peer, conn.export.info.name, error.message
        ),
    );
}
