//! An image: the storage behind one or more exports, with what must be
//! shared by everything that reads or writes it, whichever export and
//! worker a request arrives on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::backend::block_locks::BlockLocks;
use crate::backend::{Backend, CopyBeforeWrite};
use crate::meta::base_allocation::Scanner;
use crate::meta::extent_cache::ExtentCache;
use crate::track::Tracker;

pub struct Image {
    /// Position in the server's image list: workers keep per-image state
    /// (checkpoint gates, state-file commits) indexed by it.
    pub id: usize,
    pub backend: Backend,
    /// Cached allocation of a file (None: memory, block device, or off).
    pub extent_cache: Option<ExtentCache>,
    /// Descriptors the lookup helpers scan allocation with.
    pub scanner: Scanner,
    /// Orders mutations that share a partially covered block (see
    /// `backend::block_locks`).
    pub locks: BlockLocks,
    /// Change tracking (see `track`); every mutation marks it first.
    pub track: Option<Arc<Tracker>>,
    /// Copy-before-write snapshots of this image: every mutation preserves
    /// the old data of what it covers first.
    preserving: RwLock<Vec<Arc<CopyBeforeWrite>>>,
    /// `preserving` is not empty (so mutations without snapshots touch no
    /// shared cache line but this one, read-only).
    any_preserving: AtomicBool,
}

impl Image {
    /// `extent_cache_entries` of 0 turns the cache off.
    pub fn new(id: usize, backend: Backend, extent_cache_entries: usize, track: Option<Arc<Tracker>>) -> Self {
        let extent_cache = match &backend {
            Backend::File(f) if !f.is_block_device && extent_cache_entries > 0 => {
                Some(ExtentCache::new(extent_cache_entries, f.size))
            }
            _ => None,
        };
        let locks = BlockLocks::new(backend.alignment(), backend.size());
        let (preserving, any_preserving) = (RwLock::new(Vec::new()), AtomicBool::new(false));
        Self { id, backend, extent_cache, scanner: Scanner::new(), locks, track, preserving, any_preserving }
    }

    /// Starts preserving old data for `snapshot` (called with the image's
    /// mutations frozen, so every later one sees it).
    pub fn add_copy_before_write(&self, snapshot: Arc<CopyBeforeWrite>) {
        let mut list = self.preserving.write().expect("preserving lock");
        list.push(snapshot);
        self.any_preserving.store(true, Ordering::Release);
    }

    /// Stops preserving for `snapshot`.
    pub fn remove_copy_before_write(&self, snapshot: &Arc<CopyBeforeWrite>) {
        let mut list = self.preserving.write().expect("preserving lock");
        list.retain(|s| !Arc::ptr_eq(s, snapshot));
        self.any_preserving.store(!list.is_empty(), Ordering::Release);
    }

    /// The image has copy-before-write snapshots (one load, no lock).
    pub fn has_snapshots(&self) -> bool {
        self.any_preserving.load(Ordering::Acquire)
    }

    /// The copy-before-write snapshots whose old data every mutation must
    /// preserve before it runs (`backend::preserving_io`); None, without
    /// touching the lock, when there are none.
    pub fn snapshots(&self) -> Option<RwLockReadGuard<'_, Vec<Arc<CopyBeforeWrite>>>> {
        if !self.any_preserving.load(Ordering::Acquire) {
            return None;
        }
        Some(self.preserving.read().expect("preserving lock"))
    }

    /// Mutations must wait for their marks to be durable (the tracker has a
    /// state file that takes writes).
    pub fn commits_marks(&self) -> bool {
        self.track.as_ref().is_some_and(|t| t.sync_fd().is_some())
    }
}
