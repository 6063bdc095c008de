//! An image: the storage behind one or more exports, with what must be
//! shared by everything that reads or writes it, whichever export and
//! worker a request arrives on.

use crate::backend::Backend;
use crate::backend::block_locks::BlockLocks;
use crate::meta::extent_cache::ExtentCache;

pub struct Image {
    pub backend: Backend,
    /// Cached allocation of a file (None: memory, block device, or off).
    pub extent_cache: Option<ExtentCache>,
    /// Orders mutations that share a partially covered block (see
    /// `backend::block_locks`).
    pub locks: BlockLocks,
}

impl Image {
    /// `extent_cache_entries` of 0 turns the cache off.
    pub fn new(backend: Backend, extent_cache_entries: usize) -> Self {
        let extent_cache = match &backend {
            Backend::File(f) if !f.is_block_device && extent_cache_entries > 0 => {
                Some(ExtentCache::new(extent_cache_entries, f.size))
            }
            _ => None,
        };
        let locks = BlockLocks::new(backend.alignment(), backend.size());
        Self { backend, extent_cache, locks }
    }
}
