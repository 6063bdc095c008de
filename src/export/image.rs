//! An image: the storage behind one or more exports, with what must be
//! shared by everything that reads or writes it, whichever export and
//! worker a request arrives on.

use std::sync::Arc;

use crate::backend::Backend;
use crate::backend::block_locks::BlockLocks;
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
        Self { id, backend, extent_cache, scanner: Scanner::new(), locks, track }
    }

    /// Mutations must wait for their marks to be durable (the tracker has a
    /// state file that takes writes).
    pub fn commits_marks(&self) -> bool {
        self.track.as_ref().is_some_and(|t| t.sync_fd().is_some())
    }
}
