//! Who is using an export: its transmission connections, counted from the
//! moment a handshake hands one over until the worker lets it go, and
//! whether the export has been removed (it takes no new connections, and
//! whoever removed it waits for the count to reach zero before the image
//! is flushed and closed).

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::Export;

/// Part of every [`Export`].
#[derive(Debug, Default)]
pub struct Usage {
    connections: AtomicUsize,
    removed: AtomicBool,
    /// Removed with `--force`: its connections are closed wherever they
    /// are (also one that was moving between workers when it happened).
    forced: AtomicBool,
}

impl Usage {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// From now on [`Export::attach`] fails. A connection that attached
    /// before is counted: both sides use SeqCst, so either the attach saw
    /// the flag, or the remover's later reading of the count sees it.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::SeqCst);
    }

    /// Marks the removal as forced (before the workers are told).
    pub fn force(&self) {
        self.forced.store(true, Ordering::SeqCst);
    }

    pub fn is_forced(&self) -> bool {
        self.forced.load(Ordering::SeqCst)
    }
}

/// One connection's use of an export; dropping it (when the connection is
/// released, or never reaches a worker) gives the use back.
pub struct Attachment(Arc<Export>);

impl Export {
    /// Counts a new connection to this export, unless it has been removed
    /// (a handshake that negotiated it just before it left the offer).
    pub fn attach(self: &Arc<Self>) -> Option<Attachment> {
        self.usage.connections.fetch_add(1, Ordering::SeqCst);
        if self.usage.is_removed() {
            self.usage.connections.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Attachment(Arc::clone(self)))
    }
}

impl Attachment {
    pub fn export(&self) -> &Arc<Export> {
        &self.0
    }
}

impl Deref for Attachment {
    type Target = Export;

    fn deref(&self) -> &Export {
        &self.0
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.0.usage.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{ExportOptions, open_all};

    #[test]
    fn attachments_count_until_dropped_and_a_removed_export_takes_none() {
        let options = ExportOptions::for_tests();
        let export = Arc::new(open_all(&["memory:1M".parse().unwrap()], &options).unwrap().remove(0));
        let (a, b) = (export.attach().unwrap(), export.attach().unwrap());
        assert_eq!(export.usage.connections(), 2);
        assert_eq!(a.info.name, "memory0", "an attachment reads as its export");
        drop(a);
        export.usage.remove();
        assert!(export.attach().is_none());
        assert!(!export.usage.is_forced(), "a plain removal lets connections finish");
        export.usage.force();
        assert!(export.usage.is_forced());
        assert_eq!(export.usage.connections(), 1, "the refused attach left no count behind");
        drop(b);
        assert_eq!(export.usage.connections(), 0);
    }
}
