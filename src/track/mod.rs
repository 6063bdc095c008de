//! Change tracking: which parts of an image changed since each checkpoint.
//!
//! Time is cut into eras. Every granule of the image records the era in
//! which it last changed (`eras`); a checkpoint records the era that was
//! current when it was created, and creating one starts the next era. So
//! "changed since checkpoint C" is "granule era > C's era", and one pass over
//! the eras answers it for every checkpoint at once (the `ringnbd:era`
//! context hands the eras themselves to clients).
//!
//! Crash safety follows dm-era's rule: before a mutation's data is
//! submitted, the granules it touches carry the current era durably (the
//! engine marks them, then waits for one fdatasync of the state file that
//! covers every mark of its ring turn). A crash at any instant therefore
//! leaves every granule whose data may have changed since a checkpoint
//! marked as changed; a write in flight may be over-reported, never missed.
//!
//! Checkpoints are created while every worker has the image's mutations
//! frozen and drained (see `engine::worker::gates`), so each write is
//! entirely before or entirely after one. The header (eras, checkpoints,
//! the clean-shutdown record used to notice changes made while ringnbd was
//! not running) is written to alternating slots of the state file
//! (`state_file`), so updating it is atomic.

pub mod eras;
pub mod since;
pub mod state_file;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;

use crate::proto::extent::Extent;
use crate::proto::reply::{DescriptorFormat, Encoded};

use eras::EraMap;
use state_file::{CHECKPOINTS_MAX, CheckpointRecord, ERAS_OFFSET, Header, NAME_BYTES_MAX, StateError};

/// Default tracking granularity: 64 KiB (64 MiB of eras per TiB at most).
pub const GRANULE_SHIFT_DEFAULT: u32 = 16;
/// Checkpoint names: printable ASCII without spaces, at most this long.
pub const CHECKPOINT_NAME_BYTES_MAX: usize = 128;
const _: () = assert!(CHECKPOINT_NAME_BYTES_MAX <= NAME_BYTES_MAX);

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TrackError {
    #[error("state file {path}: {source}")]
    State { path: PathBuf, source: StateError },
    #[error("state file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A name that cannot be a checkpoint (or a context name).
    #[error("bad checkpoint name {0:?}: use 1 to 128 printable ASCII characters without spaces")]
    BadName(String),
    #[error("checkpoint {0:?} already exists")]
    Duplicate(String),
    #[error("no checkpoint named {0:?}")]
    Unknown(String),
    #[error("at most {CHECKPOINTS_MAX} checkpoints per image; delete some first")]
    TooMany,
    /// A read-only export needs the state a read-write run left.
    #[error("no tracking state at {0} to serve read-only (serve the image read-write with tracking first)")]
    Missing(PathBuf),
    /// Checkpoints cannot be made or removed on a read-only tracker.
    #[error("the export is served read-only: its checkpoints cannot change")]
    ReadOnly,
}

/// A checkpoint as clients and the control socket see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub name: String,
    /// Changes after the checkpoint have higher eras than this.
    pub era: u32,
    pub created_unix_ms: u64,
    /// False when the image was changed outside ringnbd since: what changed
    /// since the checkpoint is then unknown.
    pub valid: bool,
}

impl From<&CheckpointRecord> for Checkpoint {
    fn from(r: &CheckpointRecord) -> Self {
        Checkpoint { name: r.name.clone(), era: r.era, created_unix_ms: r.created_unix_ms, valid: !r.invalid }
    }
}

/// What start-up found, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenNote {
    /// A new state file.
    Created,
    /// The previous run did not shut down cleanly: the marks still cover
    /// every change it made, but changes made outside ringnbd after it
    /// stopped cannot be detected.
    Recovered,
    /// The image changed size or modification time while ringnbd was not
    /// running; these checkpoints are no longer trustworthy.
    ModifiedOutside { invalidated: Vec<String> },
}

/// Size and modification time of an image, for the clean-shutdown record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageStat {
    pub size: u64,
    pub mtime: (i64, u32),
}

impl ImageStat {
    pub fn of(meta: &std::fs::Metadata, size: u64) -> Self {
        ImageStat { size, mtime: (meta.mtime(), meta.mtime_nsec() as u32) }
    }
}

struct Persistent {
    file: File,
    path: PathBuf,
}

pub struct Tracker {
    eras: EraMap,
    /// The era marks go to now. Advances only in `create`.
    current_era: AtomicU32,
    /// The state file marks go to (None: in memory, or served read-only).
    persistent: Option<Persistent>,
    state_path: Option<PathBuf>,
    header: Mutex<Header>,
    /// A snapshot's copy: checkpoints never change and nothing marks it.
    frozen: bool,
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Checks a checkpoint name.
pub fn valid_name(name: &str) -> bool {
    (1..=CHECKPOINT_NAME_BYTES_MAX).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic())
}

impl Tracker {
    /// Tracking in memory only (memory exports): nothing survives the process.
    pub fn in_memory(size: u64, granule_shift: u32) -> io::Result<Self> {
        Ok(Self {
            eras: EraMap::in_memory(size, granule_shift)?,
            current_era: AtomicU32::new(1),
            persistent: None,
            state_path: None,
            header: Mutex::new(Header {
                sequence: 0,
                granule_shift,
                clean_shutdown: false,
                image_size: size,
                image_mtime: (0, 0),
                current_era: 1,
                checkpoints: Vec::new(),
            }),
            frozen: false,
        })
    }

    /// A read-only copy of the tracking state as it is now, in memory: what
    /// a snapshot of the image serves (changes up to the snapshot since
    /// each earlier checkpoint). Called while the image's mutations are
    /// frozen, so the copy is of one instant.
    pub fn frozen_copy(&self) -> io::Result<Self> {
        let header = self.header.lock().expect("tracker lock").clone();
        Ok(Self {
            eras: self.eras.copy_in_memory()?,
            current_era: AtomicU32::new(header.current_era),
            persistent: None,
            state_path: None,
            header: Mutex::new(header),
            frozen: true,
        })
    }

    /// Opens (or, when `writable`, creates) the state file of an image and
    /// checks it against the image. A writable tracker records that the
    /// image is in use (not cleanly shut down) before returning, so a crash
    /// from here on is recognised. A read-only one never writes the file:
    /// it serves the checkpoints it found (an export served read-only).
    pub fn open(
        path: &Path,
        image: ImageStat,
        granule_shift: u32,
        writable: bool,
    ) -> Result<(Self, Option<OpenNote>), TrackError> {
        let io_error = |source| TrackError::Io { path: path.to_owned(), source };
        let state_error = |source| TrackError::State { path: path.to_owned(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(writable)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound if !writable => TrackError::Missing(path.to_owned()),
                _ => io_error(e),
            })?;
        let (mut header, note) = match state_file::load(&file).map_err(state_error)? {
            None if !writable => return Err(TrackError::Missing(path.to_owned())),
            None => {
                let fresh = Header {
                    sequence: 0,
                    granule_shift,
                    clean_shutdown: false,
                    image_size: image.size,
                    image_mtime: image.mtime,
                    current_era: 1,
                    checkpoints: Vec::new(),
                };
                (fresh, Some(OpenNote::Created))
            }
            Some(mut header) => {
                let changed =
                    header.image_size != image.size || (header.clean_shutdown && header.image_mtime != image.mtime);
                let note = if changed {
                    let mut invalidated = Vec::new();
                    for c in header.checkpoints.iter_mut().filter(|c| !c.invalid) {
                        c.invalid = true;
                        invalidated.push(c.name.clone());
                    }
                    Some(OpenNote::ModifiedOutside { invalidated })
                } else if !header.clean_shutdown {
                    Some(OpenNote::Recovered)
                } else {
                    None
                };
                (header, note)
            }
        };
        let granule_shift = header.granule_shift;
        let needed = ERAS_OFFSET + EraMap::bytes_for(image.size, granule_shift) as u64;
        let long_enough = file.metadata().map_err(io_error)?.len() >= needed;
        let eras = if writable {
            if !long_enough {
                // Sparse: eras never written take no space.
                file.set_len(needed).map_err(io_error)?;
            }
            header.image_size = image.size;
            header.clean_shutdown = false;
            header.sequence += 1;
            state_file::store(&file, &header).map_err(io_error)?;
            EraMap::in_file(&file, ERAS_OFFSET, image.size, granule_shift, true).map_err(io_error)?
        } else if long_enough {
            EraMap::in_file(&file, ERAS_OFFSET, image.size, granule_shift, false).map_err(io_error)?
        } else {
            // The image grew: every checkpoint was invalidated above, and
            // the eras cannot be read past the file's end.
            EraMap::in_memory(image.size, granule_shift).map_err(io_error)?
        };
        let tracker = Self {
            eras,
            current_era: AtomicU32::new(header.current_era),
            persistent: writable.then(|| Persistent { file, path: path.to_owned() }),
            state_path: Some(path.to_owned()),
            header: Mutex::new(header),
            frozen: false,
        };
        Ok((tracker, note))
    }

    pub fn current_era(&self) -> u32 {
        self.current_era.load(Ordering::Acquire)
    }

    pub fn granule_bytes(&self) -> u64 {
        self.eras.granule_bytes()
    }

    /// Marks `[offset, end)` as changing in the current era. True when the
    /// marks must be made durable (an fdatasync of [`Self::sync_fd`] started
    /// after this call) before the mutation's data is submitted; then call
    /// [`Self::made_durable`].
    pub fn mark(&self, offset: u64, end: u64) -> bool {
        self.eras.mark(offset, end, self.current_era())
    }

    /// A sync that started after `mark(offset, end)` completed.
    pub fn made_durable(&self, offset: u64, end: u64) {
        self.eras.set_durable(offset, end);
    }

    /// The descriptor whose fdatasync makes marks durable (None in memory).
    pub fn sync_fd(&self) -> Option<RawFd> {
        self.persistent.as_ref().map(|p| p.file.as_raw_fd())
    }

    pub fn state_path(&self) -> Option<&Path> {
        self.state_path.as_deref()
    }

    /// Checkpoints can be created and deleted (not served read-only).
    pub fn is_writable(&self) -> bool {
        !self.frozen && (self.persistent.is_some() || self.state_path.is_none())
    }

    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        self.header.lock().expect("tracker lock").checkpoints.iter().map(Checkpoint::from).collect()
    }

    pub fn find(&self, name: &str) -> Option<Checkpoint> {
        self.checkpoints().into_iter().find(|c| c.name == name)
    }

    /// Creates a checkpoint at the current era and starts the next one,
    /// durably before returning. The caller has frozen and drained every
    /// mutation of the image, so no mark races the era change.
    pub fn create(&self, name: &str) -> Result<Checkpoint, TrackError> {
        self.check_create(name)?;
        let mut header = self.header.lock().expect("tracker lock");
        if header.checkpoints.iter().any(|c| c.name == name) {
            return Err(TrackError::Duplicate(name.to_owned()));
        }
        let era = header.current_era;
        let record = CheckpointRecord { name: name.to_owned(), era, created_unix_ms: now_unix_ms(), invalid: false };
        let mut next = header.clone();
        next.checkpoints.push(record.clone());
        next.current_era = era.checked_add(1).ok_or(TrackError::TooMany)?;
        next.sequence += 1;
        self.persist(&next)?;
        *header = next;
        // Nothing marks while the image is frozen, so no mark can land in
        // the old era after the bits are cleared.
        self.eras.clear_durable();
        self.current_era.store(era + 1, Ordering::Release);
        Ok(Checkpoint::from(&record))
    }

    /// Whether `create(name)` would be refused now (checked before the
    /// image is frozen, so a bad request never stalls writes).
    pub fn check_create(&self, name: &str) -> Result<(), TrackError> {
        if !self.is_writable() {
            return Err(TrackError::ReadOnly);
        }
        if !valid_name(name) {
            return Err(TrackError::BadName(name.to_owned()));
        }
        let header = self.header.lock().expect("tracker lock");
        if header.checkpoints.iter().any(|c| c.name == name) {
            return Err(TrackError::Duplicate(name.to_owned()));
        }
        if header.checkpoints.len() >= CHECKPOINTS_MAX {
            return Err(TrackError::TooMany);
        }
        Ok(())
    }

    /// Forgets a checkpoint (eras are shared by all checkpoints, so nothing
    /// else is freed: the record was all it owned).
    pub fn delete(&self, name: &str) -> Result<(), TrackError> {
        if !self.is_writable() {
            return Err(TrackError::ReadOnly);
        }
        let mut header = self.header.lock().expect("tracker lock");
        let Some(index) = header.checkpoints.iter().position(|c| c.name == name) else {
            return Err(TrackError::Unknown(name.to_owned()));
        };
        let mut next = header.clone();
        let removed = next.checkpoints.remove(index);
        next.sequence += 1;
        self.persist(&next)?;
        *header = next;
        self.eras.forget_since(removed.era);
        Ok(())
    }

    /// Records a clean shutdown with the image's final size and
    /// modification time (call after the image's last flush).
    pub fn shut_down_cleanly(&self, image: ImageStat) -> Result<(), TrackError> {
        if self.persistent.is_none() {
            return Ok(());
        }
        let mut header = self.header.lock().expect("tracker lock");
        let mut next = header.clone();
        next.clean_shutdown = true;
        next.image_size = image.size;
        next.image_mtime = image.mtime;
        next.sequence += 1;
        self.persist(&next)?;
        *header = next;
        Ok(())
    }

    /// The state file could not be synced: marks may be lost, so no
    /// checkpoint can vouch for what changed since it. Marks every
    /// checkpoint invalid (persisted if the file still takes writes) and
    /// returns the names that were valid.
    pub fn invalidate_all(&self) -> Vec<String> {
        let mut header = self.header.lock().expect("tracker lock");
        let mut next = header.clone();
        let mut invalidated = Vec::new();
        for c in next.checkpoints.iter_mut().filter(|c| !c.invalid) {
            c.invalid = true;
            invalidated.push(c.name.clone());
        }
        next.sequence += 1;
        // Invalid in memory whatever happens to the write.
        let _ = self.persist(&next);
        *header = next;
        invalidated
    }

    fn persist(&self, header: &Header) -> Result<(), TrackError> {
        let Some(p) = &self.persistent else { return Ok(()) };
        // The era array's pages go out with the header's fdatasync.
        state_file::store(&p.file, header).map_err(|source| TrackError::Io { path: p.path.clone(), source })
    }

    /// `qemu:dirty-bitmap` extents: [`eras::STATE_DIRTY`] where changed
    /// after the era `since`.
    pub fn dirty_extents(&self, offset: u64, length: u64, since: u32, extents_max: usize, out: &mut Vec<Extent>) {
        // The common case, a checkpoint mapped before: its bitmap, no lock.
        if self.eras.has_index(since) {
            return self.eras.dirty_extents(offset, length, since, extents_max, out, true);
        }
        // Bitmaps are built for live checkpoints only: a connection still
        // mapping a deleted one is answered from the eras.
        let live = || self.header.lock().expect("tracker lock").checkpoints.iter().any(|c| c.era == since);
        if !live() {
            return self.eras.dirty_extents(offset, length, since, extents_max, out, false);
        }
        self.eras.dirty_extents(offset, length, since, extents_max, out, true);
        // A delete that raced this first map may have forgotten the bitmap
        // before it existed.
        if !live() {
            self.eras.forget_since(since);
        }
    }

    /// [`Self::dirty_extents`] written straight as descriptors, once the
    /// checkpoint's bitmap exists (the first map builds it through
    /// `dirty_extents`); None until then.
    pub fn encode_dirty<F: DescriptorFormat>(
        &self,
        offset: u64,
        length: u64,
        since: u32,
        extents_max: usize,
        out: &mut [u8],
    ) -> Option<Encoded> {
        let bitmap = self.eras.since_bitmap(since)?;
        let end = (offset + length).min(self.eras.size_bytes());
        Some(bitmap.encode::<F>(offset, end, self.eras.granule_shift(), eras::STATE_DIRTY, extents_max, out))
    }

    /// `ringnbd:era` extents: the era of each range's last change.
    pub fn era_extents(&self, offset: u64, length: u64, extents_max: usize, out: &mut Vec<Extent>) {
        self.eras.era_extents(offset, length, extents_max, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 65536;

    fn stat(size: u64, sec: i64) -> ImageStat {
        ImageStat { size, mtime: (sec, 0) }
    }

    fn dirty(t: &Tracker, since: u32) -> Vec<Extent> {
        let mut out = vec![];
        t.dirty_extents(0, 8 * G, since, 100, &mut out);
        out
    }

    #[test]
    fn checkpoints_cut_eras_and_changes_after_them_are_dirty() {
        let t = Tracker::in_memory(8 * G, 16).unwrap();
        t.mark(0, 10);
        let c1 = t.create("c1").unwrap();
        assert_eq!((c1.era, t.current_era()), (1, 2));
        assert_eq!(dirty(&t, c1.era), vec![Extent { length: 8 * G, status: 0 }], "the write before c1 is not after it");
        t.mark(3 * G, 3 * G + 1);
        assert_eq!(dirty(&t, c1.era)[1], Extent { length: G, status: eras::STATE_DIRTY });
        assert!(matches!(t.create("c1"), Err(TrackError::Duplicate(_))));
        assert!(matches!(t.create("has space"), Err(TrackError::BadName(_))));
        t.delete("c1").unwrap();
        assert!(matches!(t.delete("c1"), Err(TrackError::Unknown(_))));
    }

    #[test]
    fn a_frozen_copy_keeps_the_instant_it_was_taken() {
        let t = Tracker::in_memory(8 * G, 16).unwrap();
        let c1 = t.create("c1").unwrap();
        t.mark(G, G + 1);
        let copy = t.frozen_copy().unwrap();
        t.create("snap").unwrap();
        t.mark(5 * G, 5 * G + 1);
        let dirty_in = |t: &Tracker| dirty(t, c1.era).iter().filter(|e| e.status != 0).count();
        assert_eq!((dirty_in(&t), dirty_in(&copy)), (2, 1), "later changes stay out of the copy");
        assert_eq!(copy.checkpoints().len(), 1, "only the checkpoints before it");
        assert!(!copy.is_writable());
        assert!(matches!(copy.create("x"), Err(TrackError::ReadOnly)));
        assert!(matches!(copy.delete("c1"), Err(TrackError::ReadOnly)));
    }

    #[test]
    fn state_survives_restarts_and_outside_changes_invalidate() {
        let dir = std::env::temp_dir().join(format!("ringnbd-track-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.ringnbd");
        let (t, note) = Tracker::open(&path, stat(8 * G, 100), 16, true).unwrap();
        assert_eq!(note, Some(OpenNote::Created));
        let c = t.create("base").unwrap();
        t.mark(2 * G, 2 * G + 5);
        drop(t); // a crash: no clean shutdown
        let (t, note) = Tracker::open(&path, stat(8 * G, 100), 16, true).unwrap();
        assert_eq!(note, Some(OpenNote::Recovered));
        assert_eq!(t.find("base").unwrap(), c);
        assert_eq!(dirty(&t, c.era)[1], Extent { length: G, status: eras::STATE_DIRTY }, "marks survive");
        t.shut_down_cleanly(stat(8 * G, 200)).unwrap();
        drop(t);
        let (t, note) = Tracker::open(&path, stat(8 * G, 200), 16, true).unwrap();
        assert_eq!(note, None, "clean, unchanged");
        t.shut_down_cleanly(stat(8 * G, 200)).unwrap();
        drop(t);
        // Touched while we were away.
        let (t, note) = Tracker::open(&path, stat(8 * G, 300), 16, true).unwrap();
        assert_eq!(note, Some(OpenNote::ModifiedOutside { invalidated: vec!["base".into()] }));
        assert!(!t.find("base").unwrap().valid);
        let fresh = t.create("after").unwrap();
        assert!(fresh.valid && fresh.era > c.era);
        drop(t);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
