//! Which clients may negotiate at once.
//!
//! Every socket in negotiation holds a thread and a descriptor until it
//! finishes or its deadline passes, so a flood of idle connections could fill
//! the table and lock real clients out for the whole deadline, again and
//! again. When the table is full (or one peer address holds its share of
//! it), the handshake that has gone longest without sending anything is
//! shed: its socket is shut down, its thread sees the error and exits. A
//! real client moves bytes within milliseconds, so it is never the oldest
//! idle one for long; a flood only ever sheds itself.
//!
//! Descriptors: a registered handshake's fd may be shut down by another
//! thread, so the owner deregisters (under the table lock) before it closes
//! the socket or hands it to a worker; the lock makes "shut down" and "no
//! longer ours" mutually exclusive, so a reused fd number is never touched.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slab::Slab;

/// A handshake is shed only once it has sent nothing for this long.
const IDLE_BEFORE_SHED: Duration = Duration::from_millis(250);

struct Entry {
    fd: RawFd,
    peer: String,
    /// Milliseconds since the table's epoch at the last byte received.
    progress: Arc<AtomicU64>,
    shed: bool,
}

#[derive(Default)]
struct Table {
    entries: Slab<Entry>,
    per_peer: HashMap<String, usize>,
}

pub struct Handshakes {
    table: Mutex<Table>,
    epoch: Instant,
    max: usize,
    per_peer_max: usize,
}

/// A registered handshake; dropping it deregisters (do so before closing
/// or handing off the socket).
pub struct Ticket {
    handshakes: Arc<Handshakes>,
    key: usize,
    progress: Arc<AtomicU64>,
}

impl Ticket {
    /// Records that the client just sent something.
    pub fn progressed(&self) {
        self.progress.store(self.handshakes.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut table = self.handshakes.table.lock().expect("handshake table lock");
        let entry = table.entries.remove(self.key);
        if !entry.shed {
            Handshakes::forget_peer(&mut table, &entry.peer);
        }
    }
}

impl Handshakes {
    /// At most `max` handshakes at once, and at most a quarter of them (but
    /// no fewer than 16) from one peer address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table::default()),
            epoch: Instant::now(),
            max,
            per_peer_max: (max / 4).max(16).min(max),
        })
    }

    /// Milliseconds since the epoch, offset so that "long ago" needs no
    /// negative numbers.
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1_000_000
    }

    fn forget_peer(table: &mut Table, peer: &str) {
        if let Some(count) = table.per_peer.get_mut(peer) {
            *count -= 1;
            if *count == 0 {
                table.per_peer.remove(peer);
            }
        }
    }

    /// Registers a new handshake on `fd` from `peer`, shedding the oldest
    /// idle one if the table (or this peer's share) is full. None: every
    /// handshake in the way is busy, so the new one is refused.
    pub fn admit(self: &Arc<Self>, fd: RawFd, peer: &str) -> Option<Ticket> {
        let mut table = self.table.lock().expect("handshake table lock");
        let live = table.entries.iter().filter(|(_, e)| !e.shed).count();
        let from_peer = table.per_peer.get(peer).copied().unwrap_or(0);
        if from_peer >= self.per_peer_max {
            self.shed_oldest(&mut table, Some(peer))?;
        } else if live >= self.max {
            self.shed_oldest(&mut table, None)?;
        }
        let progress = Arc::new(AtomicU64::new(self.now_ms()));
        let entry = Entry { fd, peer: peer.to_owned(), progress: Arc::clone(&progress), shed: false };
        let key = table.entries.insert(entry);
        *table.per_peer.entry(peer.to_owned()).or_default() += 1;
        Some(Ticket { handshakes: Arc::clone(self), key, progress })
    }

    /// Sheds the handshake (of `peer`, if given) idle the longest; at the
    /// file-descriptor limit the accept loop calls it to make room. False if
    /// none has been idle long enough.
    pub fn shed_idle(&self) -> bool {
        let mut table = self.table.lock().expect("handshake table lock");
        self.shed_oldest(&mut table, None).is_some()
    }

    /// At shutdown: ends the reading side of every handshake in progress,
    /// so that a thread blocked on a client that sends nothing sees end of
    /// file at once instead of at its deadline. One that has read an option
    /// still answers it (NBD_REP_ERR_SHUTDOWN) before it closes.
    pub fn end_all(&self) {
        let table = self.table.lock().expect("handshake table lock");
        for (_, entry) in table.entries.iter().filter(|(_, e)| !e.shed) {
            // SAFETY: as in `shed_oldest`: registered fds are not closed or
            // handed off before they deregister under the lock we hold.
            unsafe { libc::shutdown(entry.fd, libc::SHUT_RD) };
        }
    }

    fn shed_oldest(&self, table: &mut Table, peer: Option<&str>) -> Option<()> {
        let idle_before = self.now_ms().saturating_sub(IDLE_BEFORE_SHED.as_millis() as u64);
        let (_, oldest) = table
            .entries
            .iter_mut()
            .filter(|(_, e)| !e.shed && peer.is_none_or(|p| e.peer == p))
            .map(|(key, e)| (e.progress.load(Ordering::Relaxed), (key, e)))
            .filter(|(progress, _)| *progress <= idle_before)
            .min_by_key(|(progress, _)| *progress)?;
        let (_, entry) = oldest;
        entry.shed = true;
        // SAFETY: the fd belongs to a registered handshake, which cannot close
        // or hand it off before deregistering under the lock we hold.
        unsafe { libc::shutdown(entry.fd, libc::SHUT_RDWR) };
        // A shed handshake no longer counts against its peer.
        let peer = entry.peer.clone();
        Self::forget_peer(table, &peer);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn idle(handshakes: &Handshakes, ticket: &Ticket) {
        let long_ago = handshakes.now_ms().saturating_sub(10_000);
        ticket.progress.store(long_ago, Ordering::Relaxed);
    }

    #[test]
    fn a_full_table_sheds_the_oldest_idle_handshake() {
        let handshakes = Handshakes::new(2);
        let pairs: Vec<_> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        let first = handshakes.admit(pairs[0].0.as_raw_fd(), "a").unwrap();
        let second = handshakes.admit(pairs[1].0.as_raw_fd(), "b").unwrap();
        assert!(handshakes.admit(pairs[2].0.as_raw_fd(), "c").is_none(), "both busy: refused");
        idle(&handshakes, &second);
        let third = handshakes.admit(pairs[2].0.as_raw_fd(), "c").expect("the idle one is shed");
        let mut byte = [0u8; 1];
        use std::io::Read;
        assert_eq!((&pairs[1].0).read(&mut byte).unwrap(), 0, "shed socket was shut down");
        drop((first, second, third));
        assert!(handshakes.table.lock().unwrap().entries.is_empty());
        assert!(handshakes.table.lock().unwrap().per_peer.is_empty());
    }

    #[test]
    fn one_peer_cannot_take_more_than_its_share() {
        let handshakes = Handshakes::new(64);
        let pairs: Vec<_> = (0..17).map(|_| UnixStream::pair().unwrap()).collect();
        let tickets: Vec<_> = pairs[..16].iter().map(|p| handshakes.admit(p.0.as_raw_fd(), "x").unwrap()).collect();
        assert!(handshakes.admit(pairs[16].0.as_raw_fd(), "x").is_none());
        assert!(handshakes.admit(pairs[16].0.as_raw_fd(), "y").is_some(), "other peers are unaffected");
        idle(&handshakes, &tickets[3]);
        assert!(handshakes.admit(pairs[16].0.as_raw_fd(), "x").is_some(), "sheds its own idle handshake");
    }
}
