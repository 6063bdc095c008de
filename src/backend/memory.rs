//! A sparse in-memory export shared by every worker.
//!
//! Storage is a two-level table of fixed-size pages allocated on first write.
//! Each page has its own lock so connections on different cores only contend
//! when they touch the same 64 KiB. Unwritten pages read as zeroes and are
//! reported as holes; trimming or zeroing whole pages frees them.

use std::sync::{OnceLock, RwLock};

use crate::faults::{self, Direction};
use crate::proto::extent::{DATA, Extent, HOLE, push_capped};
use crate::proto::transmission::Command;
use crate::proto::{Failure, NbdError};

/// Allocation granularity. Large enough that the page table stays small for
/// terabyte-sized sparse exports, small enough to keep sparse writes cheap.
pub const PAGE_BYTES: usize = 64 * 1024;
/// Pages per directory: one directory covers 1 GiB.
const DIRECTORY_PAGES: usize = 16 * 1024;
const DIRECTORY_BYTES: u64 = (PAGE_BYTES * DIRECTORY_PAGES) as u64;
/// Largest memory export: 2^50 bytes (1 PiB) keeps the top-level table at
/// 1 Mi directory slots (8 MiB).
pub const MEMORY_EXPORT_BYTES_MAX: u64 = 1 << 50;

type Page = RwLock<Option<Box<[u8]>>>;

pub struct MemoryBackend {
    size: u64,
    directories: Box<[OnceLock<Box<[Page]>>]>,
}

impl MemoryBackend {
    pub fn new(size: u64) -> Self {
        assert!(size <= MEMORY_EXPORT_BYTES_MAX, "validated by the export parser");
        let count = size.div_ceil(DIRECTORY_BYTES) as usize;
        Self { size, directories: (0..count).map(|_| OnceLock::new()).collect() }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Runs a command synchronously: a memcpy under a per-page lock is
    /// cheaper than any ring round trip. `data` is the request's buffer.
    pub fn execute(&self, command: &Command, data: &mut [u8]) -> Result<(), Failure> {
        let injected = match *command {
            Command::Read { offset, length, .. } => faults::fails(Direction::Read, offset, length.into()),
            Command::Write { offset, length, .. } => faults::fails(Direction::Write, offset, length.into()),
            _ => false,
        };
        if injected {
            return Err(NbdError::Io.because("I/O error on the storage behind the export"));
        }
        match *command {
            Command::Read { offset, length, .. } => self.read(offset, &mut data[..length as usize]),
            Command::Write { offset, length, .. } => self.write(offset, &data[..length as usize]),
            Command::Trim { offset, length, .. } => self.trim(offset, length),
            Command::WriteZeroes { offset, length, no_hole, .. } => self.zero(offset, length, no_hole),
            Command::Flush | Command::Cache { .. } => {}
            Command::BlockStatus { .. } | Command::Disconnect => unreachable!("handled by the engine"),
        }
        Ok(())
    }

    fn page(&self, index: u64) -> &Page {
        let directory = &self.directories[(index / DIRECTORY_PAGES as u64) as usize];
        let pages = directory.get_or_init(|| (0..DIRECTORY_PAGES).map(|_| RwLock::new(None)).collect());
        &pages[(index % DIRECTORY_PAGES as u64) as usize]
    }

    fn existing_page(&self, index: u64) -> Option<&Page> {
        let directory = self.directories[(index / DIRECTORY_PAGES as u64) as usize].get()?;
        Some(&directory[(index % DIRECTORY_PAGES as u64) as usize])
    }

    /// Splits `[offset, offset+len)` into per-page pieces:
    /// (page index, offset within page, piece length, offset within the range).
    fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done == len {
                return None;
            }
            let at = offset + done as u64;
            let within = (at % PAGE_BYTES as u64) as usize;
            let piece = (PAGE_BYTES - within).min(len - done);
            let item = (at / PAGE_BYTES as u64, within, piece, done);
            done += piece;
            Some(item)
        })
    }

    pub fn read(&self, offset: u64, target: &mut [u8]) {
        debug_assert!(offset + target.len() as u64 <= self.size);
        for (index, within, piece, at) in Self::pieces(offset, target.len()) {
            let out = &mut target[at..at + piece];
            match self.existing_page(index).map(|p| p.read().expect("page lock poisoned")) {
                Some(guard) if guard.is_some() => {
                    out.copy_from_slice(&guard.as_ref().expect("checked")[within..within + piece])
                }
                _ => out.fill(0),
            }
        }
    }

    pub fn write(&self, offset: u64, source: &[u8]) {
        debug_assert!(offset + source.len() as u64 <= self.size);
        for (index, within, piece, at) in Self::pieces(offset, source.len()) {
            let mut page = self.page(index).write().expect("page lock poisoned");
            let bytes = page.get_or_insert_with(|| vec![0u8; PAGE_BYTES].into_boxed_slice());
            bytes[within..within + piece].copy_from_slice(&source[at..at + piece]);
        }
    }

    /// Makes the range read as zeroes. Whole pages are freed unless
    /// `allocate` (WRITE_ZEROES with NO_HOLE) asks for backing storage.
    pub fn zero(&self, offset: u64, length: u64, allocate: bool) {
        debug_assert!(offset + length <= self.size);
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let index = at / PAGE_BYTES as u64;
            let within = (at % PAGE_BYTES as u64) as usize;
            let piece = ((PAGE_BYTES - within) as u64).min(end - at) as usize;
            let whole = piece == PAGE_BYTES;
            if allocate {
                let mut page = self.page(index).write().expect("page lock poisoned");
                let bytes = page.get_or_insert_with(|| vec![0u8; PAGE_BYTES].into_boxed_slice());
                bytes[within..within + piece].fill(0);
            } else if let Some(page) = self.existing_page(index) {
                let mut page = page.write().expect("page lock poisoned");
                match (whole, page.as_mut()) {
                    (true, _) => *page = None,
                    (false, Some(bytes)) => bytes[within..within + piece].fill(0),
                    (false, None) => {}
                }
            }
            at += piece as u64;
        }
    }

    /// Discards whole pages in the range; partial pages keep their contents
    /// (TRIM is advisory).
    pub fn trim(&self, offset: u64, length: u64) {
        let first = offset.div_ceil(PAGE_BYTES as u64);
        let end = (offset + length) / PAGE_BYTES as u64;
        for index in first..end {
            if let Some(page) = self.existing_page(index) {
                *page.write().expect("page lock poisoned") = None;
            }
        }
    }

    /// Allocation map of `[offset, offset+length)`: written pages are data,
    /// the rest holes. Coalesced, at most `extents_max` entries; the last one
    /// may end short of the range.
    pub fn extents(&self, offset: u64, length: u64, extents_max: usize, out: &mut Vec<Extent>) {
        let end = offset + length;
        let mut at = offset;
        while at < end {
            let index = at / PAGE_BYTES as u64;
            let page_end = ((index + 1) * PAGE_BYTES as u64).min(end);
            let allocated = self.existing_page(index).is_some_and(|p| p.read().expect("page lock poisoned").is_some());
            let status = if allocated { DATA } else { HOLE };
            if !push_capped(out, Extent { length: page_end - at, status }, extents_max) {
                break;
            }
            at = page_end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_space_reads_zero_and_writes_round_trip_across_pages() {
        let m = MemoryBackend::new(4 * DIRECTORY_BYTES);
        let mut buf = vec![0xffu8; 100];
        m.read(DIRECTORY_BYTES - 50, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        m.write(PAGE_BYTES as u64 - 7, &data);
        let mut back = vec![0u8; data.len()];
        m.read(PAGE_BYTES as u64 - 7, &mut back);
        assert_eq!(back, data);
    }

    #[test]
    fn zero_frees_whole_pages_and_clears_partial_ones() {
        let m = MemoryBackend::new(1 << 20);
        m.write(0, &vec![1u8; 3 * PAGE_BYTES]);
        m.zero(100, 2 * PAGE_BYTES as u64, false);
        let mut out = vec![];
        m.extents(0, 3 * PAGE_BYTES as u64, 16, &mut out);
        // Page 1 is wholly zeroed and freed; pages 0 and 2 are partial.
        assert_eq!(
            out,
            vec![
                Extent { length: PAGE_BYTES as u64, status: DATA },
                Extent { length: PAGE_BYTES as u64, status: HOLE },
                Extent { length: PAGE_BYTES as u64, status: DATA },
            ]
        );
        let mut buf = vec![9u8; 3 * PAGE_BYTES];
        m.read(0, &mut buf);
        assert!(buf[..100].iter().all(|&b| b == 1));
        assert!(buf[100..100 + 2 * PAGE_BYTES].iter().all(|&b| b == 0));
        assert!(buf[100 + 2 * PAGE_BYTES..].iter().all(|&b| b == 1));
    }

    #[test]
    fn zero_with_allocate_keeps_storage_and_trim_frees_only_whole_pages() {
        let m = MemoryBackend::new(1 << 20);
        m.zero(0, PAGE_BYTES as u64, true);
        let mut out = vec![];
        m.extents(0, PAGE_BYTES as u64, 4, &mut out);
        assert_eq!(out, vec![Extent { length: PAGE_BYTES as u64, status: DATA }]);
        m.write(0, &vec![5u8; 2 * PAGE_BYTES]);
        m.trim(1, 2 * PAGE_BYTES as u64);
        out.clear();
        m.extents(0, 2 * PAGE_BYTES as u64, 4, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out[0].status == DATA && out[1].status == HOLE);
    }

    #[test]
    fn extents_respect_the_cap() {
        let m = MemoryBackend::new(1 << 20);
        for page in (0..16).step_by(2) {
            m.write(page * PAGE_BYTES as u64, &[1]);
        }
        let mut out = vec![];
        m.extents(0, 1 << 20, 3, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out.iter().map(|e| e.length).sum::<u64>(), 3 * PAGE_BYTES as u64);
    }
}
