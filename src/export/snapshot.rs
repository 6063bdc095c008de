//! Point-in-time snapshot exports (doc/snapshots.md).
//!
//! A snapshot of export `E` taken with checkpoint `C` is a read-only export
//! named `E@C` that reads exactly as `E` did when `C` was cut, while `E`
//! keeps taking writes. It is made while every worker has the image's
//! mutations frozen and drained (the same freeze that makes a checkpoint
//! atomic), as a file beside the image, `IMAGE.ringnbd-snapshot.ERA`:
//! - on file systems that clone (FICLONE: xfs, btrfs), a reflink clone of
//!   the image, served like any file;
//! - elsewhere (ext4, tmpfs), a sparse scratch file for copy-before-write
//!   (`backend::copy_before_write`): the first mutation of each chunk
//!   after the snapshot copies the old data there first.
//!
//! Either way it serves `base:allocation` as of the snapshot and the change
//! contexts of a frozen copy of the tracking state: what changed up to the
//! snapshot since each earlier checkpoint.
//!
//! Snapshots last as long as the server: deleting one (or stopping the
//! server) removes its export and its file. Connections still reading a
//! deleted clone keep their open descriptor until they close; those
//! reading a deleted copy-before-write snapshot get EIO, since nothing
//! preserves its old data any more. Files a crashed run left behind are
//! removed when the image is served again.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::backend::copy_before_write::ScratchPolicy;
use crate::backend::{Backend, CopyBeforeWrite, FileBackend};
use crate::track::Tracker;

use super::{Export, Image, flags};

/// Between an export's name and its checkpoint's in a snapshot's name.
pub const SEPARATOR: char = '@';
/// What a clone's file name adds to its image's.
const CLONE_SUFFIX: &str = ".ringnbd-snapshot.";

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The image's file system cannot clone files (snapshots fall back to
    /// copy-before-write).
    #[error("{0}: the file system cannot clone files (FICLONE: {1})")]
    CannotClone(PathBuf, io::Error),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    /// Memory exports have no file to hold a snapshot.
    #[error("export {0:?} is in memory: snapshots need a file or block device")]
    NotAFile(String),
}

/// The export name of the snapshot of `export` at `checkpoint`.
pub fn export_name(export: &str, checkpoint: &str) -> String {
    format!("{export}{SEPARATOR}{checkpoint}")
}

/// The path snapshot files of an image are named after: the image itself
/// for a regular file (a clone cannot leave its file system), its state
/// file for a block device (`/dev` is no place for scratch files; tracking
/// a block device needs `--state-dir`).
pub fn files_base<'a>(file: &'a FileBackend, tracker: &'a Tracker) -> Option<&'a Path> {
    if file.is_block_device { tracker.state_path() } else { Some(&file.path) }
}

/// Where the snapshot file for the checkpoint of era `era` goes, for an
/// image whose [`files_base`] is `image`.
pub fn clone_path(image: &Path, era: u32) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{CLONE_SUFFIX}{era}"));
    image.with_file_name(name)
}

/// Removes snapshot files named after `image` (see [`files_base`]) that an
/// earlier run left (it crashed, or was killed, before it could remove
/// them). Returns how many went.
pub fn remove_stale_clones(image: &Path) -> usize {
    let (Some(dir), Some(name)) = (image.parent(), image.file_name()) else { return 0 };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let mut prefix = name.to_os_string();
    prefix.push(CLONE_SUFFIX);
    let prefix = prefix.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let stale = entries.flatten().filter(|entry| {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        file_name.strip_prefix(&prefix).is_some_and(|era| !era.is_empty() && era.bytes().all(|b| b.is_ascii_digit()))
    });
    stale.filter(|entry| std::fs::remove_file(entry.path()).is_ok()).count()
}

/// The image of `export` as a file or block device, or why it has none.
pub fn file_of(export: &Export) -> Result<&FileBackend, SnapshotError> {
    match &export.image.backend {
        Backend::File(file) => Ok(file),
        _ => Err(SnapshotError::NotAFile(export.info.name.clone())),
    }
}

/// A new file only the server's user can read, failing if `path` exists
/// (so a snapshot never takes over a file it did not make).
fn create_private(path: &Path) -> io::Result<std::fs::File> {
    OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).custom_flags(libc::O_CLOEXEC).open(path)
}

/// A new file at `path` sharing every block of `image` (FICLONE). The
/// caller holds the image's mutations frozen. On failure nothing is left
/// at `path`; block devices cannot be cloned.
pub fn reflink(image: &FileBackend, path: &Path) -> Result<(), SnapshotError> {
    if image.is_block_device {
        let unsupported = io::Error::from_raw_os_error(libc::EOPNOTSUPP);
        return Err(SnapshotError::CannotClone(image.path.clone(), unsupported));
    }
    let io_error = |e| SnapshotError::Io(path.to_owned(), e);
    let clone = create_private(path).map_err(io_error)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the call.
    let rc = unsafe { libc::ioctl(clone.as_raw_fd(), libc::FICLONE, image.buffered_fd()) };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    let _ = std::fs::remove_file(path);
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => {
            Err(SnapshotError::CannotClone(image.path.clone(), error))
        }
        _ => Err(io_error(error)),
    }
}

/// How a snapshot holds its data.
#[derive(Clone)]
pub enum Holder {
    /// A reflink clone of the image.
    Clone,
    /// Old data copied before each first mutation (registered with the
    /// live image while it exists).
    CopyBeforeWrite(Arc<CopyBeforeWrite>),
}

/// With the image frozen: the scratch file at `path` and the preservation
/// that fills it, registered with the live image so every mutation from
/// now on copies old data first. On failure nothing is left at `path`.
pub fn start_copy_before_write(
    live: &Export,
    checkpoint: &str,
    path: &Path,
    policy: ScratchPolicy,
) -> Result<Arc<CopyBeforeWrite>, SnapshotError> {
    let file = file_of(live)?;
    let io_error = |e| SnapshotError::Io(path.to_owned(), e);
    let scratch = create_private(path).map_err(io_error)?;
    let made = std::fs::File::open(&file.path).and_then(|old_data| {
        let name = export_name(&live.info.name, checkpoint);
        CopyBeforeWrite::new(name, old_data, scratch, path.to_owned(), file.size, policy)
    });
    let preservation = Arc::new(
        made.inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
        .map_err(io_error)?,
    );
    live.image.add_copy_before_write(Arc::clone(&preservation));
    Ok(preservation)
}

/// The read-only export serving the snapshot held at `path` as `live` was
/// when it was taken, with `changes` (a frozen copy of `live`'s tracking
/// state).
pub fn open_export(
    live: &Export,
    checkpoint: &str,
    path: &Path,
    holder: &Holder,
    changes: Tracker,
    image_id: usize,
) -> Result<Export, SnapshotError> {
    let live_file = file_of(live)?;
    let (backend, cache_entries) = match holder {
        Holder::Clone => {
            let file = FileBackend::open(path, true, live_file.direct_io)
                .map_err(|e| SnapshotError::Io(path.to_owned(), io::Error::other(e.to_string())))?;
            (Backend::File(file), live.image.extent_cache.as_ref().map_or(0, |cache| cache.entries_max()))
        }
        Holder::CopyBeforeWrite(preservation) => (Backend::Snapshot(Arc::clone(preservation)), 0),
    };
    let mut info = live.info.clone();
    info.name = export_name(&live.info.name, checkpoint);
    info.description = format!("snapshot of {:?} at checkpoint {checkpoint:?}", live.info.name);
    info.flags = flags::transmission_flags(&backend, true);
    let image = Image::new(image_id, backend, cache_entries, Some(Arc::new(changes)));
    Ok(Export { info, image: Arc::new(image), read_only: true, usage: Default::default() })
}

/// A snapshot being served.
#[derive(Clone)]
pub struct Snapshot {
    /// The live export it was taken of.
    pub export: String,
    /// Its image (copy-before-write snapshots are unregistered from it).
    pub live: Arc<Image>,
    pub checkpoint: String,
    /// Its own export name (`export@checkpoint`).
    pub name: String,
    /// The clone or scratch file.
    pub path: PathBuf,
    pub holder: Holder,
    pub created_unix_ms: u64,
}

impl Snapshot {
    /// Stops preserving for it and removes its file (readers that have it
    /// open keep reading until they close).
    fn release(&self) {
        if let Holder::CopyBeforeWrite(preservation) = &self.holder {
            // Retired first: a read that checks after its data arrived
            // never passes off live data changed after this point.
            preservation.retire();
            self.live.remove_copy_before_write(preservation);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The snapshots the server serves.
#[derive(Default)]
pub struct Snapshots {
    list: Mutex<Vec<Snapshot>>,
}

impl Snapshots {
    pub fn add(&self, snapshot: Snapshot) {
        self.list.lock().expect("snapshots lock").push(snapshot);
    }

    pub fn list(&self) -> Vec<Snapshot> {
        self.list.lock().expect("snapshots lock").clone()
    }

    /// Forgets the snapshot of `export` at `checkpoint` and releases what
    /// it holds.
    pub fn remove(&self, export: &str, checkpoint: &str) -> Option<Snapshot> {
        let mut list = self.list.lock().expect("snapshots lock");
        let index = list.iter().position(|s| s.export == export && s.checkpoint == checkpoint)?;
        let snapshot = list.remove(index);
        snapshot.release();
        Some(snapshot)
    }

    /// Releases every snapshot (the server is stopping).
    pub fn remove_all(&self) {
        for snapshot in self.list.lock().expect("snapshots lock").drain(..) {
            snapshot.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_sit_beside_their_image_and_stale_ones_are_found() {
        let dir = std::env::temp_dir().join(format!("ringnbd-snapshot-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        assert_eq!(clone_path(&image, 7), dir.join("disk.img.ringnbd-snapshot.7"));
        assert_eq!(export_name("disk", "mon"), "disk@mon");
        for name in [
            "disk.img",
            "disk.img.ringnbd-snapshot.7",
            "disk.img.ringnbd-snapshot.12",
            "disk.img.ringnbd-snapshot.x",
            "other.img.ringnbd-snapshot.3",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        assert_eq!(remove_stale_clones(&image), 2);
        let mut left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["disk.img", "disk.img.ringnbd-snapshot.x", "other.img.ringnbd-snapshot.3"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_system_that_cannot_clone_is_named_and_leaves_nothing() {
        // /dev/shm is tmpfs, which has no FICLONE.
        let dir = Path::new("/dev/shm").join(format!("ringnbd-snapshot-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![7u8; 8192]).unwrap();
        let file = FileBackend::open(&image, false, false).unwrap();
        let target = clone_path(&image, 1);
        assert!(matches!(reflink(&file, &target), Err(SnapshotError::CannotClone(..))));
        assert!(!target.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
