//! The `--verify` data pattern, pure.
//!
//! Every 512-byte sector written is stamped so that a read can tell what it
//! holds without a copy of the export:
//!
//! ```text
//! @0  magic "RNBDvrfy"   @8 sector offset u64   @16 seed u64
//! @24 generation u32      @28 zero u32           @32 480 bytes of a stream
//!                                                    keyed by (seed, offset, generation)
//! ```
//! (little-endian). The seed names the run, the offset catches misplaced
//! data, the generation catches lost or stale writes, and the keyed stream
//! catches corruption anywhere in the sector.

pub const SECTOR_BYTES: usize = 512;
const MAGIC: u64 = u64::from_le_bytes(*b"RNBDvrfy");
const HEADER_BYTES: usize = 8 + 8 + 8 + 4 + 4;
const _: () = assert!(HEADER_BYTES == 32 && (SECTOR_BYTES - HEADER_BYTES).is_multiple_of(8));

/// splitmix64: a tiny, well-mixed generator; also used to derive keys.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes the stamp of one sector into `sector` (exactly 512 bytes).
pub fn stamp(sector: &mut [u8], offset: u64, seed: u64, generation: u32) {
    assert_eq!(sector.len(), SECTOR_BYTES);
    sector[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    sector[8..16].copy_from_slice(&offset.to_le_bytes());
    sector[16..24].copy_from_slice(&seed.to_le_bytes());
    sector[24..28].copy_from_slice(&generation.to_le_bytes());
    sector[28..32].copy_from_slice(&0u32.to_le_bytes());
    let mut key = seed ^ offset.rotate_left(17) ^ u64::from(generation).rotate_left(41);
    for word in sector[HEADER_BYTES..].chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix64(&mut key).to_le_bytes());
    }
}

/// Stamps every sector of a block that starts at byte `offset`.
pub fn fill(block: &mut [u8], offset: u64, seed: u64, generation: u32) {
    assert_eq!(block.len() % SECTOR_BYTES, 0, "blocks are whole sectors");
    for (i, sector) in block.chunks_exact_mut(SECTOR_BYTES).enumerate() {
        stamp(sector, offset + (i * SECTOR_BYTES) as u64, seed, generation);
    }
}

/// What a mismatched sector held instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// All zeroes (a lost write, or trimmed data).
    Zeroes,
    /// Not this tool's pattern at all.
    Foreign,
    /// A stamp from another run.
    OtherSeed(u64),
    /// An intact stamp written for a different offset.
    Misplaced { from: u64 },
    /// An intact stamp of this sector, but an older or newer generation.
    Generation(u32),
    /// The stamp header matches but the content does not.
    Corrupt,
}

/// The first bad sector of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub offset: u64,
    /// The generation that should be there (`None`: not written by this run).
    pub expected: Option<u32>,
    pub found: Found,
}

/// The verdict on one block read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockCheck {
    /// Sectors that matched their expected stamp.
    pub sectors_ok: u32,
    /// Sectors this run never wrote, so nothing was expected of them.
    pub sectors_unknown: u32,
    pub sectors_bad: u32,
    pub first_bad: Option<Mismatch>,
}

struct Stamp {
    offset: u64,
    seed: u64,
    generation: u32,
}

fn read_stamp(sector: &[u8]) -> Option<Stamp> {
    let word = |at: usize| u64::from_le_bytes(sector[at..at + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return None;
    }
    let generation = u32::from_le_bytes(sector[24..28].try_into().expect("4 bytes"));
    Some(Stamp { offset: word(8), seed: word(16), generation })
}

/// Is `sector` an intact stamp of what its own header claims?
fn intact(sector: &[u8], stamp: &Stamp, scratch: &mut [u8; SECTOR_BYTES]) -> bool {
    self::stamp(scratch, stamp.offset, stamp.seed, stamp.generation);
    sector == &scratch[..]
}

fn classify(sector: &[u8], offset: u64, seed: u64, scratch: &mut [u8; SECTOR_BYTES]) -> Found {
    let Some(found) = read_stamp(sector) else {
        return if sector.iter().all(|&b| b == 0) { Found::Zeroes } else { Found::Foreign };
    };
    if found.seed != seed {
        return Found::OtherSeed(found.seed);
    }
    if !intact(sector, &found, scratch) {
        return Found::Corrupt;
    }
    if found.offset != offset {
        return Found::Misplaced { from: found.offset };
    }
    Found::Generation(found.generation)
}

/// Checks a block read from byte `offset`. With `expected = Some(g)` every
/// sector must be stamp `g`; with `None` (never written by this run) only
/// this run's own stamps are checked: they must be intact and in place.
pub fn check(block: &[u8], offset: u64, seed: u64, expected: Option<u32>) -> BlockCheck {
    assert_eq!(block.len() % SECTOR_BYTES, 0, "blocks are whole sectors");
    let mut scratch = [0u8; SECTOR_BYTES];
    let mut verdict = BlockCheck::default();
    for (i, sector) in block.chunks_exact(SECTOR_BYTES).enumerate() {
        let sector_offset = offset + (i * SECTOR_BYTES) as u64;
        let good = match expected {
            Some(generation) => {
                stamp(&mut scratch, sector_offset, seed, generation);
                sector == &scratch[..]
            }
            None => match classify(sector, sector_offset, seed, &mut scratch) {
                Found::Zeroes | Found::Foreign | Found::OtherSeed(_) => {
                    verdict.sectors_unknown += 1;
                    continue;
                }
                // Our own stamp from this run in a block we never wrote
                // cannot happen unless the seed was reused: still, it must
                // be intact and in place.
                found => matches!(found, Found::Generation(_)),
            },
        };
        if good {
            verdict.sectors_ok += 1;
            continue;
        }
        verdict.sectors_bad += 1;
        if verdict.first_bad.is_none() {
            let found = classify(sector, sector_offset, seed, &mut scratch);
            verdict.first_bad = Some(Mismatch { offset: sector_offset, expected, found });
        }
    }
    verdict
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.expected {
            Some(g) => write!(f, "sector at {} should hold generation {g} but holds ", self.offset)?,
            None => write!(f, "sector at {} (not written by this run) holds ", self.offset)?,
        }
        match self.found {
            Found::Zeroes => write!(f, "zeroes"),
            Found::Foreign => write!(f, "data that is not this tool's pattern"),
            Found::OtherSeed(seed) => write!(f, "a stamp from another run (seed {seed:#x})"),
            Found::Misplaced { from } => write!(f, "data written for offset {from}"),
            Found::Generation(g) => write!(f, "generation {g}"),
            Found::Corrupt => write!(f, "a corrupted stamp"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 0x1234_5678;

    fn block(offset: u64, generation: u32) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        fill(&mut b, offset, SEED, generation);
        b
    }

    #[test]
    fn stamps_differ_by_offset_seed_and_generation() {
        let a = block(0, 1);
        assert_ne!(a, block(4096, 1));
        assert_ne!(a, block(0, 2));
        let mut other_seed = vec![0u8; 4096];
        fill(&mut other_seed, 0, SEED + 1, 1);
        assert_ne!(a, other_seed);
        assert_eq!(a, block(0, 1), "deterministic");
        assert_ne!(a[..512], a[512..1024], "sectors differ within a block");
    }

    #[test]
    fn a_good_block_verifies() {
        let v = check(&block(8192, 3), 8192, SEED, Some(3));
        assert_eq!(v, BlockCheck { sectors_ok: 8, ..Default::default() });
    }

    #[test]
    fn mismatches_are_classified() {
        let stale = check(&block(8192, 2), 8192, SEED, Some(3));
        assert_eq!(stale.sectors_bad, 8);
        assert_eq!(stale.first_bad.unwrap().found, Found::Generation(2));

        let misplaced = check(&block(0, 3), 8192, SEED, Some(3));
        assert_eq!(misplaced.first_bad.unwrap().found, Found::Misplaced { from: 0 });

        let zeroes = check(&[0u8; 4096], 0, SEED, Some(1));
        assert_eq!(zeroes.first_bad.unwrap().found, Found::Zeroes);

        let mut flipped = block(0, 1);
        flipped[1000] ^= 1;
        let corrupt = check(&flipped, 0, SEED, Some(1));
        assert_eq!((corrupt.sectors_ok, corrupt.sectors_bad), (7, 1));
        assert_eq!(corrupt.first_bad.unwrap(), Mismatch { offset: 512, expected: Some(1), found: Found::Corrupt });
        assert!(corrupt.first_bad.unwrap().to_string().contains("corrupted"));
    }

    #[test]
    fn unwritten_blocks_accept_foreign_data_but_not_broken_stamps() {
        let zero = check(&[0u8; 1024], 0, SEED, None);
        assert_eq!((zero.sectors_unknown, zero.sectors_bad), (2, 0));
        let foreign = check(&[0xa5u8; 1024], 0, SEED, None);
        assert_eq!((foreign.sectors_unknown, foreign.sectors_bad), (2, 0));
        let ours = check(&block(4096, 7), 4096, SEED, None);
        assert_eq!(ours.sectors_ok, 8);
        let misplaced = check(&block(0, 7), 4096, SEED, None);
        assert_eq!(misplaced.sectors_bad, 8);
        let mut broken = block(4096, 7);
        broken[600] ^= 0xff;
        assert_eq!(check(&broken, 4096, SEED, None).first_bad.unwrap().found, Found::Corrupt);
    }
}
