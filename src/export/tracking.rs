//! Turning change tracking on for an image: where its state file lives,
//! the lock that keeps a second server off it, and what start-up found.
//!
//! State files (format: doc/tracking.md) live beside the image as
//! `IMAGE.ringnbd`, or with `--state-dir DIR` as `DIR/NAME.HASH.ringnbd`,
//! where NAME is the image's file name and HASH the FNV-1a hash of its
//! canonical path (so two images called `disk.img` in different folders do
//! not collide). Block devices need `--state-dir`: `/dev` is no place for
//! state. Memory exports track in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Backend, FileBackend};
use crate::track::{ImageStat, OpenNote, Tracker};

use super::ExportError;

/// `--track`, `--state-dir`, `--track-granularity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackOptions {
    /// Track file exports (memory exports always track, in memory).
    pub files: bool,
    pub state_dir: Option<PathBuf>,
    /// log2 of the granule for new state files (existing ones keep theirs).
    pub granule_shift: u32,
}

impl Default for TrackOptions {
    fn default() -> Self {
        Self { files: false, state_dir: None, granule_shift: crate::track::GRANULE_SHIFT_DEFAULT }
    }
}

/// The tracker of an image, if it is tracked. A file image is locked first
/// (exclusively when writable), so a second server on it fails here
/// instead of both writing one state file.
pub fn open(backend: &Backend, options: &TrackOptions, read_only: bool) -> Result<Option<Arc<Tracker>>, ExportError> {
    let file = match backend {
        Backend::Memory(memory) => {
            let tracker = Tracker::in_memory(memory.size(), options.granule_shift)
                .map_err(|e| ExportError::Tracking(format!("memory export: {e}")))?;
            return Ok(Some(Arc::new(tracker)));
        }
        // A snapshot's changes are the frozen copy it was made with.
        Backend::Snapshot(_) => return Ok(None),
        // The layers record what each holds, not when it changed.
        Backend::Layered(layers) => {
            if options.files {
                crate::note!(
                    "{}: layered exports are not tracked (their layers record what each holds, not when \
                     it changed); --track applies to the other exports",
                    layers.top.path.display()
                );
            }
            return Ok(None);
        }
        Backend::File(_) if !options.files => return Ok(None),
        Backend::File(file) => file,
    };
    let path = state_path(file, options.state_dir.as_deref())?;
    file.lock(!read_only).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => ExportError::InUse(file.path.clone()),
        _ => ExportError::Tracking(format!("{}: cannot lock: {e}", file.path.display())),
    })?;
    if !read_only {
        // Holding the lock, no other server can be serving these (named
        // as `snapshot::files_base` says).
        let base = if file.is_block_device { &path } else { &file.path };
        let removed = super::snapshot::remove_stale_clones(base);
        if removed > 0 {
            crate::note!("{}: removed {removed} snapshot file(s) a previous run left", file.path.display());
        }
    }
    let metadata = file.metadata().map_err(|e| ExportError::Tracking(format!("{}: {e}", file.path.display())))?;
    let stat = ImageStat::of(&metadata, file.size);
    let (tracker, note) = Tracker::open(&path, stat, options.granule_shift, !read_only)
        .map_err(|e| ExportError::Tracking(e.to_string()))?;
    report(&file.path, &path, &tracker, note);
    Ok(Some(Arc::new(tracker)))
}

fn report(image: &Path, state: &Path, tracker: &Tracker, note: Option<OpenNote>) {
    let (image, state) = (image.display(), state.display());
    match note {
        Some(OpenNote::Created) => crate::note!("{image}: tracking changes in {state} (new)"),
        Some(OpenNote::Recovered) => crate::note!(
            "{image}: the last run did not shut down cleanly; its marks in {state} still cover every \
             change it made, so checkpoints stay valid"
        ),
        Some(OpenNote::ModifiedOutside { invalidated }) if !invalidated.is_empty() => crate::note!(
            "{image}: WARNING: the image changed (size or modification time) while ringnbd was not \
             serving it; what changed since these checkpoints is unknown, so they are now INVALID: {}",
            invalidated.join(", ")
        ),
        Some(OpenNote::ModifiedOutside { .. }) | None => {}
    }
    let invalid: Vec<String> = tracker.checkpoints().into_iter().filter(|c| !c.valid).map(|c| c.name).collect();
    if !invalid.is_empty() {
        crate::note!("{image}: invalid checkpoints (delete them): {}", invalid.join(", "));
    }
}

/// Where the state of `file` lives (see the module comment).
pub fn state_path(file: &FileBackend, state_dir: Option<&Path>) -> Result<PathBuf, ExportError> {
    let Some(dir) = state_dir else {
        if file.is_block_device {
            return Err(ExportError::Tracking(format!(
                "{}: tracking a block device needs --state-dir (its state cannot live beside it in /dev)",
                file.path.display()
            )));
        }
        let mut beside = file.path.clone().into_os_string();
        beside.push(".ringnbd");
        return Ok(PathBuf::from(beside));
    };
    let canonical = file.path.canonicalize().unwrap_or_else(|_| file.path.clone());
    let name = canonical.file_name().map_or("image".into(), |n| n.to_string_lossy().into_owned());
    Ok(dir.join(format!("{name}.{:016x}.ringnbd", fnv1a(canonical.as_os_str().as_encoded_bytes()))))
}

/// FNV-1a, 64 bits: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
