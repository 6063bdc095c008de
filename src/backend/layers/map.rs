//! A layer's record of the chunks it holds, on disk beside the layer
//! (`FILE.layer`, format in doc/layers.md) or, for a throwaway top, in
//! memory only.
//!
//! Bits are only ever set while serving, so the in-memory words are always
//! a superset of the file's. Setting is write-ahead: the caller submits the
//! data only once the new bits are durable ([`LayerMap::record`] and a sync
//! on the ring, or the blocking [`LayerMap::mark`]). Each record writes the
//! current value of its words under a short lock (so a stale word never
//! overwrites a newer one: the writes reach the page cache in lock order)
//! and the sync happens outside it, so concurrent records never queue
//! their syncs behind the lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Layers hold data in 64 KiB chunks, qcow2's default cluster size, so a
/// chain built here and the same chain built as qcow2 allocate alike.
pub const CHUNK_SHIFT: u32 = 16;
pub const CHUNK_BYTES: u64 = 1 << CHUNK_SHIFT;

const MAGIC: &[u8; 8] = b"RNBDLAYR";
const VERSION: u32 = 1;
/// The bitmap starts one page in, so bitmap writes never touch the header.
const HEADER_BYTES: u64 = 4096;

#[derive(Debug)]
pub struct LayerMap {
    /// None: in memory only (nothing to make durable).
    file: Option<File>,
    pub path: Option<PathBuf>,
    size: u64,
    words: Box<[AtomicU64]>,
    write_lock: Mutex<()>,
}

/// The map file of the layer at `layer`.
pub fn path_for(layer: &Path) -> PathBuf {
    let mut name = layer.as_os_str().to_owned();
    name.push(".layer");
    PathBuf::from(name)
}

fn chunks_of(size: u64) -> usize {
    size.div_ceil(CHUNK_BYTES) as usize
}

fn empty_words(size: u64) -> Box<[AtomicU64]> {
    (0..chunks_of(size).div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

impl LayerMap {
    /// An empty map for a layer of `size` bytes, created durably (the file
    /// and its directory entry) at `path`, which must not exist.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        let mut header = vec![0u8; HEADER_BYTES as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&CHUNK_SHIFT.to_le_bytes());
        header[16..24].copy_from_slice(&size.to_le_bytes());
        file.write_all_at(&header, 0)?;
        let words = empty_words(size);
        file.set_len(HEADER_BYTES + 8 * words.len() as u64)?;
        file.sync_all()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(Self { file: Some(file), path: Some(path.to_owned()), size, words, write_lock: Mutex::new(()) })
    }

    /// The map at `path` of a layer of `size` bytes. Errors say what is wrong.
    pub fn open(path: &Path, size: u64, writable: bool) -> Result<Self, String> {
        let shown = path.display();
        let file = OpenOptions::new().read(true).write(writable).open(path).map_err(|e| format!("{shown}: {e}"))?;
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0).map_err(|e| format!("{shown}: header: {e}"))?;
        if &header[..8] != MAGIC {
            return Err(format!("{shown}: not a ringnbd layer map"));
        }
        let field = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        if field(8) != VERSION {
            return Err(format!("{shown}: layer map version {} (this ringnbd reads {VERSION})", field(8)));
        }
        if field(12) != CHUNK_SHIFT {
            return Err(format!("{shown}: chunks of 2^{} bytes (this ringnbd uses 2^{CHUNK_SHIFT})", field(12)));
        }
        let recorded = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
        if recorded != size {
            return Err(format!("{shown}: records a layer of {recorded} bytes, the layer has {size}"));
        }
        let words = empty_words(size);
        let mut bytes = vec![0u8; 8 * words.len()];
        file.read_exact_at(&mut bytes, HEADER_BYTES).map_err(|e| format!("{shown}: bitmap: {e}"))?;
        for (word, raw) in words.iter().zip(bytes.chunks_exact(8)) {
            word.store(u64::from_le_bytes(raw.try_into().expect("8 bytes")), Ordering::Relaxed);
        }
        Ok(Self { file: Some(file), path: Some(path.to_owned()), size, words, write_lock: Mutex::new(()) })
    }

    /// A map kept in memory only (a throwaway top).
    pub fn in_memory(size: u64) -> Self {
        Self { file: None, path: None, size, words: empty_words(size), write_lock: Mutex::new(()) }
    }

    pub fn chunks(&self) -> usize {
        chunks_of(self.size)
    }

    pub fn holds(&self, chunk: usize) -> bool {
        self.words[chunk / 64].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    /// Records that the layer holds `chunks` (ascending); durable on return.
    pub fn mark(&self, chunks: &[usize]) -> io::Result<()> {
        match self.record(chunks)? {
            Some(_) => self.file.as_ref().expect("a file to sync").sync_data(),
            None => Ok(()),
        }
    }

    /// Sets the bits of `chunks` (ascending) and writes them to the map
    /// file; they are durable once the returned descriptor is synced (None:
    /// in memory only). The write goes to the page cache, so it is short;
    /// the sync is the caller's (on the ring).
    pub fn record(&self, chunks: &[usize]) -> io::Result<Option<RawFd>> {
        for &chunk in chunks {
            self.words[chunk / 64].fetch_or(1 << (chunk % 64), Ordering::AcqRel);
        }
        let Some(file) = &self.file else { return Ok(None) };
        let _serial = self.write_lock.lock().expect("layer map lock");
        let mut words: Vec<usize> = chunks.iter().map(|c| c / 64).collect();
        words.dedup();
        for run in runs(&words) {
            let bytes: Vec<u8> =
                run.clone().flat_map(|w| self.words[w].load(Ordering::Acquire).to_le_bytes()).collect();
            file.write_all_at(&bytes, HEADER_BYTES + 8 * run.start as u64)?;
        }
        Ok(Some(file.as_raw_fd()))
    }

    /// Every chunk the layer holds, ascending.
    pub fn held(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.chunks()).filter(|&c| self.holds(c))
    }
}

/// Consecutive word indexes as ranges, so a mark spanning many chunks is
/// one write per run.
fn runs(words: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &w in words {
        match out.last_mut() {
            Some(run) if run.end == w => run.end += 1,
            _ => out.push(w..w + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopening_and_headers_are_checked() {
        let dir = std::env::temp_dir().join(format!("ringnbd-layermap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("top.layer");
        let size = 200 * CHUNK_BYTES + 7;
        let map = LayerMap::create(&path, size).unwrap();
        assert_eq!(map.chunks(), 201);
        map.mark(&[0, 63, 64, 65, 200]).unwrap();
        map.mark(&[130]).unwrap();
        drop(map);
        let again = LayerMap::open(&path, size, true).unwrap();
        assert_eq!(again.held().collect::<Vec<_>>(), vec![0, 63, 64, 65, 130, 200]);
        assert!(LayerMap::open(&path, size + 1, false).unwrap_err().contains("records a layer of"));
        assert!(LayerMap::create(&path, size).is_err(), "never replaces a map");
        std::fs::write(dir.join("junk.layer"), vec![1u8; 5000]).unwrap();
        assert!(LayerMap::open(&dir.join("junk.layer"), size, false).unwrap_err().contains("not a ringnbd layer map"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn word_runs_group_neighbours() {
        assert_eq!(runs(&[0, 1, 2, 5, 7, 8]), vec![0..3, 5..6, 7..9]);
        assert!(runs(&[]).is_empty());
    }
}
