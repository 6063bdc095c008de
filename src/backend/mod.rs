//! Storage behind an export. A backend turns a command into storage
//! operations (`io::Op`) that the engine submits on its ring and reports
//! back (`file_io`), or runs it at once (`memory`). Backends know nothing of
//! rings, `user_data` or connections.

pub mod block_locks;
pub mod copy_before_write;
pub mod copy_buffers;
pub mod file;
pub mod file_io;
pub mod io;
pub mod layers;
pub mod mapping;
pub mod memory;
pub mod preserving_io;
pub mod snapshot_io;

use std::path::PathBuf;

use thiserror::Error;

pub use copy_before_write::CopyBeforeWrite;
pub use file::{FileBackend, FileIdentity};
pub use layers::Layered;
pub use memory::MemoryBackend;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The file or device could not be opened or inspected.
    #[error("{path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    /// Only regular files and block devices can be exported.
    #[error("{0}: not a regular file or block device")]
    NotAFile(PathBuf),
    /// A layer of a layered export is unusable (the message says why).
    #[error("layer {path}: {message}")]
    Layer { path: PathBuf, message: String },
}

pub enum Backend {
    File(FileBackend),
    Memory(MemoryBackend),
    /// A copy-before-write snapshot of a file image (read-only).
    Snapshot(std::sync::Arc<CopyBeforeWrite>),
    /// A writable top over read-only lower layers (`layers`).
    Layered(Layered),
}

impl Backend {
    pub fn size(&self) -> u64 {
        match self {
            Backend::File(f) => f.size,
            Backend::Memory(m) => m.size(),
            Backend::Snapshot(s) => s.size(),
            Backend::Layered(l) => l.size(),
        }
    }

    /// Offset/length alignment the hot path needs; requests that break it
    /// take the bounce/read-modify-write path.
    pub fn alignment(&self) -> u32 {
        match self {
            Backend::File(f) => f.alignment,
            Backend::Layered(l) => l.alignment(),
            Backend::Memory(_) | Backend::Snapshot(_) => 1,
        }
    }

    /// Zeroing is metadata-only (FAST_ZERO can be honoured).
    pub fn fast_zero(&self) -> bool {
        match self {
            Backend::File(f) => f.can_punch_hole,
            Backend::Layered(l) => l.top.can_punch_hole,
            Backend::Memory(_) => true,
            Backend::Snapshot(_) => false,
        }
    }
}
