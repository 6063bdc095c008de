//! Layered exports: a writable top over read-only lower layers, all raw
//! files (doc/layers.md). A read takes each range from the first layer
//! that holds it; mutations go to the top. The top holds data in chunks
//! (`map::CHUNK_BYTES`): the first mutation of a chunk that covers it only
//! in part first copies the chunk's old content up from the layers below,
//! and the chunk is recorded in the top's map, durably, before the
//! mutation is submitted. A crash at any instant therefore leaves every
//! chunk either recorded (and the top holds its complete content, or the
//! unacknowledged mutation that was in flight) or not recorded (and it
//! reads from below, as before). Trim and zeroes in the top hide what the
//! layers below hold, so TRIM is a WRITE_ZEROES here.
//!
//! Each chunk of the top is absent, claimed (one request copies it up and
//! records it, on the ring: `io`) or present. Present chunks are never
//! copied again, so the steady state of a mutation is one atomic load per
//! chunk.
//!
//! A lower layer with a map holds only the chunks in it; one without holds
//! every byte up to its size (a plain raw image), and bytes past a lower
//! layer's end read as zeroes, as qemu reads past a short backing file.

pub mod io;
pub mod map;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::meta::allocation::{Strategy, scan_file};
use crate::proto::extent::{DATA, Extent, HOLE, append_capped, push_capped};

use super::{BackendError, FileBackend};
pub use map::{CHUNK_BYTES, CHUNK_SHIFT, LayerMap};

const ABSENT: u8 = 0;
const CLAIMED: u8 = 1;
const PRESENT: u8 = 2;

/// Lower layers one export may stack (the top not counted).
pub const LOWER_LAYERS_MAX: usize = 16;

/// Where the top layer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Top {
    /// A raw file with its map beside it, both created when missing.
    File(PathBuf),
    /// A temporary top, unlinked at once, so it is gone at exit or crash.
    Throwaway,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    pub top: Top,
    /// Highest first.
    pub lowers: Vec<PathBuf>,
}

/// Which layer a byte comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Top,
    /// Index into `lowers`.
    Lower(usize),
    /// No layer holds it: zeroes.
    Nowhere,
}

impl Owner {
    /// `qemu:allocation-depth`: 0 unallocated, 1 the top, 2 the layer below...
    pub fn depth(self) -> u32 {
        match self {
            Owner::Nowhere => 0,
            Owner::Top => 1,
            Owner::Lower(i) => i as u32 + 2,
        }
    }
}

pub struct Lower {
    pub file: FileBackend,
    /// None: holds every byte up to its size.
    pub map: Option<LayerMap>,
    strategy: Strategy,
    /// `file.size` rounded up to the alignment: a direct read may reach
    /// that far (and comes back short).
    readable_end: u64,
}

pub struct Layered {
    pub top: FileBackend,
    top_map: LayerMap,
    states: Box<[AtomicU8]>,
    top_strategy: Strategy,
    pub lowers: Vec<Lower>,
    pub throwaway: bool,
    size: u64,
    alignment: u32,
    /// One commit at a time.
    committing: Mutex<()>,
    /// Chunks copied up from below (for `ctl` and tests).
    copied_up: AtomicU64,
}

fn open_error(path: &Path) -> impl FnOnce(std::io::Error) -> BackendError + '_ {
    move |source| BackendError::Open { path: path.to_owned(), source }
}

fn layer_error(path: &Path, message: String) -> BackendError {
    BackendError::Layer { path: path.to_owned(), message }
}

impl Layered {
    pub fn open(spec: &LayerSpec, read_only: bool, direct_io: bool) -> Result<Self, BackendError> {
        if spec.lowers.is_empty() || spec.lowers.len() > LOWER_LAYERS_MAX {
            let message = format!("a layered export needs 1 to {LOWER_LAYERS_MAX} lower layers");
            return Err(layer_error(Path::new(""), message));
        }
        let mut lowers = Vec::with_capacity(spec.lowers.len());
        for path in &spec.lowers {
            let file = FileBackend::open(path, true, direct_io)?;
            let map_path = map::path_for(path);
            let map = match map_path.exists() {
                // Writable where it may be, for `ctl commit` into this layer.
                true => Some(
                    LayerMap::open(&map_path, file.size, true)
                        .or_else(|_| LayerMap::open(&map_path, file.size, false))
                        .map_err(|m| layer_error(path, m))?,
                ),
                false => None,
            };
            // Not locked: a base is typically shared by many readers, qemu
            // among them, and a whole-file read lock reads to qemu's image
            // locking as a writer (it would refuse to open the chain).
            let strategy = Strategy::for_file(file.buffered_fd());
            lowers.push(Lower { file, map, strategy, readable_end: 0 });
        }
        let size = lowers[0].file.size;
        let (mut top, top_map, throwaway) = match &spec.top {
            Top::File(path) => {
                let (top, map) = open_top(path, size, read_only, direct_io)?;
                (top, map, false)
            }
            Top::Throwaway => {
                let top = throwaway_top(size, direct_io)?;
                let map = LayerMap::in_memory(top.size);
                (top, map, true)
            }
        };
        top.lock(!read_only).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => layer_error(&top.path, "in use by another process".into()),
            _ => layer_error(&top.path, format!("cannot lock: {e}")),
        })?;
        top.probe_hole_punching();
        let alignment = lowers.iter().map(|l| l.file.alignment).fold(top.alignment, u32::max);
        for lower in &mut lowers {
            lower.readable_end = lower.file.size.div_ceil(u64::from(alignment)) * u64::from(alignment);
        }
        let states =
            (0..top_map.chunks()).map(|c| AtomicU8::new(if top_map.holds(c) { PRESENT } else { ABSENT })).collect();
        let top_strategy = Strategy::for_file(top.buffered_fd());
        let size = top.size;
        Ok(Self {
            top,
            top_map,
            states,
            top_strategy,
            lowers,
            throwaway,
            size,
            alignment,
            committing: Mutex::new(()),
            copied_up: AtomicU64::new(0),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    pub fn top_map_path(&self) -> Option<&Path> {
        self.top_map.path.as_deref()
    }

    pub fn chunks_copied_up(&self) -> u64 {
        self.copied_up.load(Ordering::Relaxed)
    }

    /// Chunks the top holds now.
    pub fn top_chunks(&self) -> usize {
        (0..self.states.len()).filter(|&c| self.is_present(c)).count()
    }

    fn is_present(&self, chunk: usize) -> bool {
        self.states[chunk].load(Ordering::Acquire) == PRESENT
    }

    pub(super) fn chunk_range(&self, chunk: usize) -> (u64, u64) {
        let start = (chunk as u64) << CHUNK_SHIFT;
        (start, (start + CHUNK_BYTES).min(self.size))
    }

    /// The owner of byte `at` (below the top when `below_top`) and the byte
    /// up to which that answer holds without looking again.
    fn owner_at(&self, at: u64, below_top: bool) -> (Owner, u64) {
        let chunk = (at >> CHUNK_SHIFT) as usize;
        let chunk_end = ((chunk as u64) + 1) << CHUNK_SHIFT;
        if !below_top && self.is_present(chunk) {
            return (Owner::Top, chunk_end);
        }
        for (i, lower) in self.lowers.iter().enumerate() {
            let holds = at < lower.readable_end && lower.map.as_ref().is_none_or(|m| m.holds(chunk));
            if holds {
                return (Owner::Lower(i), chunk_end.min(lower.readable_end));
            }
        }
        (Owner::Nowhere, chunk_end)
    }

    /// The run of bytes from `at` with one owner, cut at `end`: `(stop, owner)`.
    pub fn run_from(&self, at: u64, end: u64, below_top: bool) -> (u64, Owner) {
        let (owner, mut stop) = self.owner_at(at, below_top);
        while stop < end {
            let (next, next_stop) = self.owner_at(stop, below_top);
            if next != owner {
                break;
            }
            stop = next_stop;
        }
        (stop.min(end), owner)
    }

    pub(super) fn file_of(&self, owner: Owner) -> Option<&FileBackend> {
        match owner {
            Owner::Top => Some(&self.top),
            Owner::Lower(i) => Some(&self.lowers[i].file),
            Owner::Nowhere => None,
        }
    }

    /// The chunks `[offset, end)` touches (empty when it lies past the end).
    pub(super) fn chunks_of(&self, offset: u64, end: u64) -> std::ops::Range<usize> {
        let end = end.min(self.size);
        if offset >= end {
            return 0..0;
        }
        (offset >> CHUNK_SHIFT) as usize..((end - 1) >> CHUNK_SHIFT) as usize + 1
    }

    /// Claims the absent chunks of `*next..range.end` in ascending order,
    /// advancing `*next`; false when another request is bringing one up
    /// (the caller retries later, keeping what it claimed: claims are taken
    /// in ascending order, so no two requests wait for each other). Sets
    /// `*claimed` once this request claimed any.
    pub(super) fn claim(&self, next: &mut usize, range: &std::ops::Range<usize>, claimed: &mut bool) -> bool {
        while *next < range.end {
            let state = &self.states[*next];
            // The steady state: a load, no write to the shared line (a
            // failing compare-exchange would still take it exclusively).
            if state.load(Ordering::Acquire) != PRESENT {
                match state.compare_exchange(ABSENT, CLAIMED, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => *claimed = true,
                    Err(PRESENT) => {}
                    Err(_) => return false,
                }
            }
            *next += 1;
        }
        true
    }

    /// Whether `chunk` is claimed; for a request that claimed through it,
    /// that means claimed by that request (see [`Self::claim`]).
    pub(super) fn is_claimed(&self, chunk: usize) -> bool {
        self.states[chunk].load(Ordering::Acquire) == CLAIMED
    }

    /// Writes the map bits of the claimed chunks of `range` (the caller's,
    /// see [`Self::claim`]); they are durable once the returned descriptor
    /// is synced (None: the map is in memory, nothing to sync).
    pub(super) fn record(&self, range: std::ops::Range<usize>) -> std::io::Result<Option<std::os::fd::RawFd>> {
        let claimed: Vec<usize> = range.filter(|&c| self.is_claimed(c)).collect();
        self.top_map.record(&claimed)
    }

    /// Ends this request's claims in `range`: present after a durable
    /// record, absent again after a failure.
    pub(super) fn settle(&self, range: std::ops::Range<usize>, recorded: bool) {
        let to = if recorded { PRESENT } else { ABSENT };
        for chunk in range {
            if self.is_claimed(chunk) {
                self.states[chunk].store(to, Ordering::Release);
            }
        }
    }

    pub(super) fn count_copy_up(&self) {
        self.copied_up.fetch_add(1, Ordering::Relaxed);
    }

    /// Which layer each range of `[offset, end)` comes from, as
    /// `qemu:allocation-depth` extents (capped, coalesced).
    pub fn depths(&self, offset: u64, end: u64, extents_max: usize, out: &mut Vec<Extent>) {
        let mut at = offset;
        while at < end {
            let (stop, owner) = self.run_from(at, end, false);
            if !push_capped(out, Extent { length: stop - at, status: owner.depth() }, extents_max) {
                return;
            }
            at = stop;
        }
    }

    /// `base:allocation` of the composed view: each run scanned in the
    /// layer it comes from. Blocking; for the lookup helper.
    pub fn scan(&self, offset: u64, end: u64, extents_max: usize, out: &mut Vec<Extent>) -> std::io::Result<()> {
        let end = end.min(self.size);
        let mut at = offset;
        while at < end && out.len() < extents_max {
            let (stop, owner) = self.run_from(at, end, false);
            let mut run = Vec::new();
            match owner {
                Owner::Nowhere => run.push(Extent { length: stop - at, status: HOLE }),
                Owner::Lower(i) if self.lowers[i].file.is_block_device => {
                    run.push(Extent { length: stop - at, status: DATA })
                }
                Owner::Lower(i) => {
                    let lower = &self.lowers[i];
                    let mut strategy = lower.strategy;
                    let within = stop.min(lower.file.size);
                    if at < within {
                        scan_file(lower.file.buffered_fd(), at, within, extents_max, &mut strategy, &mut run)?;
                    }
                    // Past a short layer's end: zeroes nobody holds.
                    if run.iter().map(|e| e.length).sum::<u64>() == within.saturating_sub(at) && within < stop {
                        run.push(Extent { length: stop - within, status: HOLE });
                    }
                }
                Owner::Top => {
                    let mut strategy = self.top_strategy;
                    scan_file(self.top.buffered_fd(), at, stop, extents_max, &mut strategy, &mut run)?;
                }
            }
            match append_capped(out, run, extents_max) {
                None => return Ok(()),
                Some(0) => break,
                Some(covered) => at += covered,
            }
        }
        Ok(())
    }

    /// `ctl commit`: copies every chunk the top holds into the layer right
    /// below, durably, while serving. The top keeps its chunks, so the
    /// composed view never changes and no read races with the copy; a
    /// chunk written during the commit may reach the lower layer old or
    /// new, and stays right in the top. Returns the chunks committed.
    pub fn commit(&self) -> Result<usize, String> {
        let _one_at_a_time = self.committing.lock().expect("commit lock");
        let lower = &self.lowers[0];
        let path = &lower.file.path;
        let shown = path.display();
        if lower.file.is_block_device || lower.file.size < self.size {
            return Err(format!("{shown}: the layer below is shorter than the export; commit would not fit"));
        }
        let target = OpenOptions::new().write(true).open(path).map_err(|e| format!("{shown}: {e}"))?;
        let source = self.top.buffered_file();
        let held: Vec<usize> = (0..self.states.len()).filter(|&c| self.is_present(c)).collect();
        let mut buffer = Vec::new();
        for &chunk in &held {
            let (start, stop) = self.chunk_range(chunk);
            buffer.resize((stop - start) as usize, 0);
            source.read_exact_at(&mut buffer, start).map_err(|e| format!("{}: {e}", self.top.path.display()))?;
            target.write_all_at(&buffer, start).map_err(|e| format!("{shown}: {e}"))?;
        }
        target.sync_data().map_err(|e| format!("{shown}: {e}"))?;
        // Data before the record: a crash in between leaves the chunks
        // unrecorded below, where the top still covers them.
        if let Some(map) = &lower.map {
            map.mark(&held).map_err(|e| format!("{}: {e}", map::path_for(path).display()))?;
        }
        Ok(held.len())
    }
}

/// The top of a layered export: opened with its map, or both created (the
/// map first, so a top file never exists without one after a crash).
fn open_top(path: &Path, size: u64, read_only: bool, direct_io: bool) -> Result<(FileBackend, LayerMap), BackendError> {
    let map_path = map::path_for(path);
    if !path.exists() {
        if read_only {
            return Err(layer_error(path, "no such top layer (a read-only export does not create one)".into()));
        }
        let map = match LayerMap::create(&map_path, size) {
            Ok(map) => map,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let map = LayerMap::open(&map_path, size, true).map_err(|m| layer_error(path, m))?;
                if map.held().next().is_some() {
                    let message = format!("the top layer is gone but {} records data in it", map_path.display());
                    return Err(layer_error(path, message));
                }
                map
            }
            Err(e) => return Err(open_error(&map_path)(e)),
        };
        let file = OpenOptions::new().write(true).create_new(true).open(path).map_err(open_error(path))?;
        file.set_len(size).map_err(open_error(path))?;
        file.sync_all().map_err(open_error(path))?;
        drop(map);
    } else if !map_path.exists() {
        let message = format!(
            "has no layer map ({}), so which of its bytes are its own is unknown; use a new top file",
            map_path.display()
        );
        return Err(layer_error(path, message));
    }
    let top = FileBackend::open(path, read_only, direct_io)?;
    if top.is_block_device {
        return Err(layer_error(path, "a top layer must be a regular file".into()));
    }
    let map = LayerMap::open(&map_path, top.size, !read_only).map_err(|m| layer_error(path, m))?;
    Ok((top, map))
}

/// A sparse temporary file as the top, unlinked as soon as it is open.
fn throwaway_top(size: u64, direct_io: bool) -> Result<FileBackend, BackendError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let name = format!("ringnbd-throwaway-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let path = dir.join(name);
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(open_error(&path))?;
    file.set_len(size).map_err(open_error(&path))?;
    let top = FileBackend::open(&path, false, direct_io);
    let _ = std::fs::remove_file(&path);
    top
}

/// Reads `out.len()` bytes at `offset`, zeroes past the end of the file.
pub(super) fn read_to_eof(file: &FileBackend, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
    let handle = file.buffered_file();
    let mut done = 0;
    while done < out.len() {
        match handle.read_at(&mut out[done..], offset + done as u64) {
            Ok(0) => {
                out[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = CHUNK_BYTES;

    /// A new top over mid (8 chunks, its map holding chunks 1 and 2) over
    /// base (a plain raw image of 6 chunks, shorter than the export).
    fn chain(tag: &str) -> (PathBuf, Layered) {
        let dir = std::env::temp_dir().join(format!("ringnbd-layers-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (base, mid, top) = (dir.join("base"), dir.join("mid"), dir.join("top"));
        std::fs::write(&base, vec![0xb0; (6 * CHUNK) as usize]).unwrap();
        std::fs::write(&mid, vec![0x30; (8 * CHUNK) as usize]).unwrap();
        LayerMap::create(&map::path_for(&mid), 8 * CHUNK).unwrap().mark(&[1, 2]).unwrap();
        let spec = LayerSpec { top: Top::File(top), lowers: vec![mid, base] };
        (dir, Layered::open(&spec, false, false).unwrap())
    }

    #[test]
    fn reads_fall_through_to_the_first_layer_holding_each_chunk() {
        let (dir, layers) = chain("owners");
        assert_eq!(layers.size(), 8 * CHUNK, "sized as the first lower layer");
        let depths = |layers: &Layered| -> Vec<(u64, u32)> {
            let mut out = Vec::new();
            layers.depths(0, layers.size(), 100, &mut out);
            out.iter().map(|e| (e.length, e.status)).collect()
        };
        // base up to chunk 6, mid in 1..3, nothing past the base's end.
        assert_eq!(depths(&layers), vec![(CHUNK, 3), (2 * CHUNK, 2), (3 * CHUNK, 3), (2 * CHUNK, 0)]);
        assert_eq!(layers.run_from(0, layers.size(), false), (CHUNK, Owner::Lower(1)));
        assert_eq!(layers.run_from(CHUNK, layers.size(), false), (3 * CHUNK, Owner::Lower(0)));
        assert_eq!(layers.run_from(6 * CHUNK, layers.size(), false), (8 * CHUNK, Owner::Nowhere));

        let (mut next, mut claimed) = (1, false);
        assert!(layers.claim(&mut next, &(1..3), &mut claimed));
        assert!(claimed && layers.is_claimed(1) && layers.is_claimed(2));
        // Another request over chunk 2 waits while it is being brought up.
        let (mut other, mut other_claimed) = (0, false);
        assert!(!layers.claim(&mut other, &(0..3), &mut other_claimed));
        assert_eq!(other, 1, "it keeps chunk 0 and stops at the claimed one");
        assert_eq!(layers.run_from(CHUNK, layers.size(), false).1, Owner::Lower(0), "claimed is not yet the top's");
        layers.settle(1..3, true);
        assert!(layers.claim(&mut other, &(0..3), &mut other_claimed));
        layers.settle(0..3, false);
        assert_eq!(depths(&layers), vec![(CHUNK, 3), (2 * CHUNK, 1), (3 * CHUNK, 3), (2 * CHUNK, 0)]);
        assert_eq!(layers.run_from(CHUNK, layers.size(), true), (3 * CHUNK, Owner::Lower(0)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn recorded_chunks_survive_reopening() {
        let (dir, layers) = chain("record");
        let (mut next, mut claimed) = (3, false);
        assert!(layers.claim(&mut next, &(3..5), &mut claimed));
        let fd = layers.record(3..5).unwrap().expect("a map file to sync");
        // SAFETY: fdatasync on the map's descriptor, open for `layers`' life.
        assert_eq!(unsafe { libc::fdatasync(fd) }, 0);
        layers.settle(3..5, true);
        assert_eq!(layers.top_chunks(), 2);
        drop(layers);
        let spec = LayerSpec { top: Top::File(dir.join("top")), lowers: vec![dir.join("mid"), dir.join("base")] };
        let again = Layered::open(&spec, true, false).unwrap();
        assert_eq!(again.top_map.held().collect::<Vec<_>>(), vec![3, 4]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
