//! Change tracking on the worker: every mutation of a tracked image passes
//! a gate and marks its range before its data is touched.
//!
//! - **Gate** (per image): counts the worker's mutations of the image from
//!   their start to their reply. A checkpoint freezes the gate on every
//!   worker: new mutations are held, and once none is in flight the worker
//!   says so; the checkpoint is cut while all are drained, so each mutation
//!   is entirely before it or entirely after it. Thawing starts the held
//!   mutations in order.
//! - **Commit** (per image with a state file): a mutation whose marks are
//!   not yet durable waits; at the end of the loop turn one fdatasync of
//!   the state file is submitted for every mutation that started waiting
//!   in the turn (group commit), and only its completion lets their data
//!   writes go. A sync already in flight may have missed marks made after
//!   it was submitted, so those wait for a sync of their own, which is
//!   submitted at once (up to [`SYNCS_IN_FLIGHT_MAX`]) rather than after
//!   the first completes. Each sync carries a sequence number, and its
//!   completion releases its own group and every older one still waiting
//!   (a sync covers every mark made before it was submitted), whatever
//!   order the syncs complete in. If a sync fails, the mutations of every
//!   group in flight fail with EIO and every checkpoint of the image is
//!   invalidated: marks may be lost, so none can vouch for its changes.

use std::collections::VecDeque;
use std::sync::Arc;

use crossbeam_channel::Sender;
use io_uring::{opcode, types};

use crate::backend::file_io::client_range;
use crate::faults;
use crate::proto::NbdError;
use crate::track::Tracker;

use super::super::handoff::WorkerMessage;
use super::super::user_data::Token;
use super::super::write_path::Mutation;
use super::Worker;

#[derive(Default)]
pub(super) struct Gate {
    frozen: bool,
    /// Mutations of the image started on this worker and not yet replied.
    inflight: usize,
    /// Mutations held while frozen, in arrival order.
    held: VecDeque<u32>,
    /// Told once `inflight` reaches zero while frozen.
    drained: Option<Sender<()>>,
}

/// State-file syncs one worker keeps in flight per image.
const SYNCS_IN_FLIGHT_MAX: usize = 4;

#[derive(Default)]
pub(super) struct Commit {
    /// Marked, waiting for the next sync.
    waiting: Vec<u32>,
    /// One group per sync in flight, oldest first, with its sequence.
    syncing: VecDeque<(u16, Vec<u32>)>,
    /// Syncs submitted but not completed (groups may have failed first).
    in_flight: usize,
    next_sequence: u16,
    /// Emptied group vectors, reused.
    spare: Vec<Vec<u32>>,
}

/// Makes `states[id]` exist.
fn grow_to<T: Default>(states: &mut Vec<T>, id: usize) {
    if states.len() <= id {
        states.resize_with(id + 1, T::default);
    }
}

/// `a` was submitted no later than `b` (wrapping sequence numbers, with
/// far fewer than 2^15 syncs in flight).
fn not_after(a: u16, b: u16) -> bool {
    (b.wrapping_sub(a) as i16) >= 0
}

impl Worker {
    /// Whether a request may run now. A mutation of a tracked image is
    /// counted in its gate and marked; false when it is held by a frozen
    /// gate or waits for a commit (it is started again from there).
    pub(super) fn pass_tracking(&mut self, request: u32) -> bool {
        let Worker { requests, conns, gates, commits, commit_wanted, .. } = self;
        let req = &mut requests[request as usize];
        if req.gated || Mutation::of(&req.command).is_none() {
            return true;
        }
        let image = &conns[req.conn as usize].export.image;
        let Some(tracker) = &image.track else { return true };
        grow_to(gates, image.id);
        grow_to(commits, image.id);
        let gate = &mut gates[image.id];
        if gate.frozen {
            gate.held.push_back(request);
            return false;
        }
        gate.inflight += 1;
        req.gated = true;
        let (offset, end) = client_range(&req.command);
        if tracker.mark(offset, end) {
            commits[image.id].waiting.push(request);
            *commit_wanted = true;
            return false;
        }
        true
    }

    /// A gated mutation has its reply: it no longer holds the gate.
    pub(super) fn leave_gate(&mut self, image: usize) {
        let gate = &mut self.gates[image];
        gate.inflight -= 1;
        if gate.inflight == 0
            && let Some(drained) = gate.drained.take()
        {
            let _ = drained.send(());
        }
    }

    /// Submits one state-file sync per image with mutations waiting (end
    /// of the loop turn: every mark of the turn is in).
    pub(super) fn submit_commits(&mut self) {
        if !std::mem::take(&mut self.commit_wanted) {
            return;
        }
        for image in 0..self.commits.len() {
            let commit = &self.commits[image];
            if commit.waiting.is_empty() {
                continue;
            }
            if commit.in_flight >= SYNCS_IN_FLIGHT_MAX {
                // A completion submits it (see on_commit).
                continue;
            }
            let fd = self.tracker_of(commit.waiting[0]).sync_fd().expect("only state files commit");
            let commit = &mut self.commits[image];
            let next = commit.spare.pop().unwrap_or_default();
            let group = std::mem::replace(&mut commit.waiting, next);
            let sequence = commit.next_sequence;
            commit.next_sequence = sequence.wrapping_add(1);
            commit.syncing.push_back((sequence, group));
            commit.in_flight += 1;
            let token = Token::Commit { image: image as u16, sequence };
            let entry =
                opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build().user_data(token.encode());
            // The descriptor belongs to the image's tracker, which lives at
            // least as long as the connections of the mutations waiting on
            // this sync (each holds its export, which holds the image).
            self.push(entry);
        }
    }

    pub(super) fn on_commit(&mut self, image: usize, sequence: u16, result: i32) {
        let commit = &mut self.commits[image];
        commit.in_flight -= 1;
        if !commit.waiting.is_empty() {
            self.commit_wanted = true;
        }
        // Groups of failed syncs are gone; nothing waits on this one.
        let Some((_, first)) = self.commits[image].syncing.front() else { return };
        let tracker = Arc::clone(self.tracker_of(first[0]));
        let commit = &self.commits[image];
        let own = commit.syncing.iter().find(|(s, _)| *s == sequence).map(|(_, group)| group);
        let injected = own.is_some_and(|group| {
            group.iter().any(|&r| {
                let (offset, end) = client_range(&self.requests[r as usize].command);
                faults::state_sync_fails(offset, end)
            })
        });
        let result = if injected { -libc::EIO } else { result };
        if result >= 0 {
            while self.commits[image].syncing.front().is_some_and(|(s, _)| not_after(*s, sequence)) {
                let (_, mut group) = self.commits[image].syncing.pop_front().expect("checked");
                for &request in &group {
                    let (offset, end) = client_range(&self.requests[request as usize].command);
                    tracker.made_durable(offset, end);
                    self.run_request(request);
                }
                group.clear();
                self.commits[image].spare.push(group);
            }
            return;
        }
        // Which marks the failure lost is unknown: fail every group in flight.
        let failed: Vec<u32> = self.commits[image].syncing.drain(..).flat_map(|(_, group)| group).collect();
        let invalidated = tracker.invalidate_all();
        crate::note!(
            "worker {}: syncing change-tracking state {} failed ({}): {} write(s) failed with EIO; \
             checkpoints invalidated: {}",
            self.index,
            tracker.state_path().map_or("?".into(), |p| p.display().to_string()),
            std::io::Error::from_raw_os_error(-result),
            failed.len(),
            if invalidated.is_empty() { "none".to_owned() } else { invalidated.join(", ") }
        );
        for request in failed {
            let error = NbdError::Io.because("change-tracking state could not be saved");
            self.requests[request as usize].error = Some(error);
            self.finish(request, false);
        }
    }

    /// The tracker of the image a waiting mutation writes to.
    fn tracker_of(&self, request: u32) -> &Arc<Tracker> {
        let conn = self.requests[request as usize].conn;
        self.conns[conn as usize].export.image.track.as_ref().expect("only tracked images commit")
    }

    pub(super) fn on_control(&mut self, message: WorkerMessage) {
        match message {
            WorkerMessage::Connection(_) | WorkerMessage::Moved(_) => unreachable!("handled by on_wake"),
            WorkerMessage::Freeze { image, drained } => {
                if self.draining {
                    // Dropping `drained` tells the control plane we are
                    // going away; it gives up on the checkpoint.
                    return;
                }
                // An image no connection here has written yet: its gate is
                // made now, so a connection arriving mid-freeze is held too.
                grow_to(&mut self.gates, image);
                grow_to(&mut self.commits, image);
                let gate = &mut self.gates[image];
                gate.frozen = true;
                if gate.inflight == 0 {
                    let _ = drained.send(());
                } else {
                    gate.drained = Some(drained);
                }
            }
            WorkerMessage::Thaw { image } => self.thaw(image),
            WorkerMessage::CloseExport { export } => self.close_export(&export),
            WorkerMessage::Stats { reply } => {
                let Some(counters) = &self.counters else { return };
                let live: Vec<(usize, u64, u64)> =
                    self.conns.iter().map(|(_, c)| (c.counters_slot, 1, c.inflight as u64)).collect();
                let _ = reply.send(counters.snapshot(self.index, &live));
            }
        }
    }

    /// Lets held mutations of `image` go, in the order they arrived.
    pub(super) fn thaw(&mut self, image: usize) {
        // A freeze this worker dropped (it was shutting down) made no gate.
        let Some(gate) = self.gates.get_mut(image) else { return };
        gate.frozen = false;
        gate.drained = None;
        let held = std::mem::take(&mut gate.held);
        for request in held {
            self.start_request(request);
        }
    }

    /// Shutdown: nothing may stay held, or draining would never end.
    pub(super) fn thaw_all(&mut self) {
        for image in 0..self.gates.len() {
            self.thaw(image);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::not_after;

    #[test]
    fn sequences_compare_across_the_wrap() {
        assert!(not_after(3, 3) && not_after(3, 4) && !not_after(4, 3));
        assert!(not_after(u16::MAX, 1), "1 comes after 65535 once it wraps");
        assert!(!not_after(1, u16::MAX));
    }
}
