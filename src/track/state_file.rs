//! The change-tracking state file: two header slots and the era array.
//!
//! Layout (all integers little-endian; see doc/tracking.md):
//!
//! ```text
//! 0        header slot 0 (64 KiB)
//! 64 KiB   header slot 1 (64 KiB)
//! 128 KiB  era array: one u32 per granule
//! ```
//!
//! A header is written to the slot its sequence number selects (even: 0,
//! odd: 1) and made durable with fdatasync, so the other slot always holds
//! the previous complete header: a crash while writing leaves one valid
//! slot, and loading takes the valid slot with the higher sequence. Each
//! slot carries a CRC-32 over its bytes (with the CRC field zero).
//!
//! Slot contents:
//!
//! ```text
//! 0    magic "RNBDTRK1"          8 bytes
//! 8    version                   u32 (1)
//! 12   crc32                     u32
//! 16   sequence                  u64
//! 24   granule_shift             u32
//! 28   flags                     u32 (bit 0: the server shut down cleanly)
//! 32   image_size                u64
//! 40   image_mtime_sec           i64 (at the clean shutdown)
//! 48   image_mtime_nsec          u32
//! 52   current_era               u32
//! 56   checkpoint_count          u32
//! 60   reserved                  u32 (0)
//! 128  checkpoints, 160 bytes each:
//!        era u32, flags u32 (bit 0: invalid), created_unix_ms u64,
//!        name_len u16, name (up to 142 bytes)
//! ```

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use thiserror::Error;

pub const SLOT_BYTES: usize = 64 * 1024;
/// Where the era array starts.
pub const ERAS_OFFSET: u64 = 2 * SLOT_BYTES as u64;
const MAGIC: &[u8; 8] = b"RNBDTRK1";
const VERSION: u32 = 1;
const CHECKPOINTS_OFFSET: usize = 128;
const CHECKPOINT_BYTES: usize = 160;
/// Checkpoint name bytes that fit a record.
pub const NAME_BYTES_MAX: usize = CHECKPOINT_BYTES - 18;
/// Checkpoint records that fit a slot.
pub const CHECKPOINTS_MAX: usize = (SLOT_BYTES - CHECKPOINTS_OFFSET) / CHECKPOINT_BYTES;
const _: () = assert!(CHECKPOINTS_MAX >= 256 && NAME_BYTES_MAX >= 128);
const FLAG_CLEAN: u32 = 1;
const CHECKPOINT_INVALID: u32 = 1;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Neither header slot is readable: the file was damaged from outside.
    #[error("both header slots are damaged")]
    Damaged,
    /// A header from a newer ringnbd.
    #[error("state file version {0} is newer than this ringnbd understands ({VERSION})")]
    Version(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub name: String,
    pub era: u32,
    pub created_unix_ms: u64,
    pub invalid: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub granule_shift: u32,
    pub clean_shutdown: bool,
    pub image_size: u64,
    pub image_mtime: (i64, u32),
    pub current_era: u32,
    pub checkpoints: Vec<CheckpointRecord>,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        assert!(self.checkpoints.len() <= CHECKPOINTS_MAX);
        let mut slot = vec![0u8; SLOT_BYTES];
        slot[0..8].copy_from_slice(MAGIC);
        slot[8..12].copy_from_slice(&VERSION.to_le_bytes());
        slot[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        slot[24..28].copy_from_slice(&self.granule_shift.to_le_bytes());
        let flags = if self.clean_shutdown { FLAG_CLEAN } else { 0 };
        slot[28..32].copy_from_slice(&flags.to_le_bytes());
        slot[32..40].copy_from_slice(&self.image_size.to_le_bytes());
        slot[40..48].copy_from_slice(&self.image_mtime.0.to_le_bytes());
        slot[48..52].copy_from_slice(&self.image_mtime.1.to_le_bytes());
        slot[52..56].copy_from_slice(&self.current_era.to_le_bytes());
        slot[56..60].copy_from_slice(&(self.checkpoints.len() as u32).to_le_bytes());
        for (i, c) in self.checkpoints.iter().enumerate() {
            let at = CHECKPOINTS_OFFSET + i * CHECKPOINT_BYTES;
            let record = &mut slot[at..at + CHECKPOINT_BYTES];
            assert!(c.name.len() <= NAME_BYTES_MAX, "names are validated before they get here");
            record[0..4].copy_from_slice(&c.era.to_le_bytes());
            let flags = if c.invalid { CHECKPOINT_INVALID } else { 0 };
            record[4..8].copy_from_slice(&flags.to_le_bytes());
            record[8..16].copy_from_slice(&c.created_unix_ms.to_le_bytes());
            record[16..18].copy_from_slice(&(c.name.len() as u16).to_le_bytes());
            record[18..18 + c.name.len()].copy_from_slice(c.name.as_bytes());
        }
        let crc = crc32fast::hash(&slot);
        slot[12..16].copy_from_slice(&crc.to_le_bytes());
        slot
    }

    /// A slot's header, or None if it is empty or damaged.
    fn decode(slot: &[u8]) -> Result<Option<Header>, StateError> {
        let le32 = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
        let le64 = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
        if &slot[0..8] != MAGIC {
            return Ok(None);
        }
        if le32(8) > VERSION {
            return Err(StateError::Version(le32(8)));
        }
        let mut zeroed = slot.to_vec();
        zeroed[12..16].fill(0);
        if crc32fast::hash(&zeroed) != le32(12) {
            return Ok(None);
        }
        let count = le32(56) as usize;
        if count > CHECKPOINTS_MAX {
            return Ok(None);
        }
        let mut checkpoints = Vec::with_capacity(count);
        for i in 0..count {
            let at = CHECKPOINTS_OFFSET + i * CHECKPOINT_BYTES;
            let record = &slot[at..at + CHECKPOINT_BYTES];
            let name_len = usize::from(u16::from_le_bytes([record[16], record[17]]));
            if name_len > NAME_BYTES_MAX {
                return Ok(None);
            }
            let Ok(name) = std::str::from_utf8(&record[18..18 + name_len]) else { return Ok(None) };
            checkpoints.push(CheckpointRecord {
                name: name.to_owned(),
                era: u32::from_le_bytes(record[0..4].try_into().expect("4 bytes")),
                invalid: u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) & CHECKPOINT_INVALID != 0,
                created_unix_ms: u64::from_le_bytes(record[8..16].try_into().expect("8 bytes")),
            });
        }
        Ok(Some(Header {
            sequence: le64(16),
            granule_shift: le32(24),
            clean_shutdown: le32(28) & FLAG_CLEAN != 0,
            image_size: le64(32),
            image_mtime: (le64(40) as i64, le32(48)),
            current_era: le32(52),
            checkpoints,
        }))
    }
}

/// Reads the newest valid header; None for a new (empty) file.
pub fn load(file: &File) -> Result<Option<Header>, StateError> {
    let length = file.metadata()?.len();
    if length == 0 {
        return Ok(None);
    }
    let mut best: Option<Header> = None;
    let mut any_written = false;
    let mut slot = vec![0u8; SLOT_BYTES];
    for index in 0..2u64 {
        slot.fill(0);
        let got = file.read_at(&mut slot, index * SLOT_BYTES as u64)?;
        any_written |= slot[..got].iter().any(|&b| b != 0);
        if got < SLOT_BYTES {
            continue;
        }
        if let Some(header) = Header::decode(&slot)?
            && best.as_ref().is_none_or(|b| header.sequence > b.sequence)
        {
            best = Some(header);
        }
    }
    match best {
        Some(header) => Ok(Some(header)),
        // Created, but no header was ever completed: a crash at creation.
        None if !any_written => Ok(None),
        None => Err(StateError::Damaged),
    }
}

/// Writes `header` to its slot and makes it durable.
pub fn store(file: &File, header: &Header) -> io::Result<()> {
    let slot = header.encode();
    file.write_all_at(&slot, (header.sequence % 2) * SLOT_BYTES as u64)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(sequence: u64) -> Header {
        Header {
            sequence,
            granule_shift: 16,
            clean_shutdown: sequence.is_multiple_of(3),
            image_size: 1 << 30,
            image_mtime: (1_700_000_000, 123_456_789),
            current_era: 7,
            checkpoints: vec![
                CheckpointRecord { name: "full".into(), era: 2, created_unix_ms: 1, invalid: false },
                CheckpointRecord { name: "x".repeat(NAME_BYTES_MAX), era: 6, created_unix_ms: 2, invalid: true },
            ],
        }
    }

    fn temp(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("ringnbd-state-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        (path, file)
    }

    #[test]
    fn headers_round_trip_and_the_newer_slot_wins() {
        let (path, file) = temp("round");
        assert_eq!(load(&file).unwrap(), None, "a new file has no header");
        store(&file, &header(1)).unwrap();
        store(&file, &header(2)).unwrap();
        assert_eq!(load(&file).unwrap(), Some(header(2)));
        store(&file, &header(3)).unwrap();
        assert_eq!(load(&file).unwrap().unwrap().sequence, 3);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other_and_two_are_damage() {
        let (path, file) = temp("torn");
        store(&file, &header(4)).unwrap();
        store(&file, &header(5)).unwrap();
        // A crash half-way through writing slot 1 (sequence 5).
        file.write_all_at(&[0xff; 100], SLOT_BYTES as u64 + 200).unwrap();
        assert_eq!(load(&file).unwrap().unwrap().sequence, 4, "the previous header survives");
        file.write_all_at(&[0xff; 100], 300).unwrap();
        assert!(matches!(load(&file), Err(StateError::Damaged)));
        std::fs::remove_file(path).unwrap();
    }
}
