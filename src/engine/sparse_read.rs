//! Sparse structured READ replies: runs of zeroes go out as OFFSET_HOLE
//! chunks instead of zero-filled OFFSET_DATA, as qemu-nbd does.
//!
//! The data is checked block by block for zeroes, so holes, unwritten
//! extents and written zeroes all shrink on the wire (a hole chunk says
//! "reads as zeroes", which is true of all three). The read itself is
//! unchanged (one READ of the whole range), so this costs a scan of the
//! buffer, which stops at the first non-zero word of a data block, and never
//! an extra syscall, lock or cache lookup.

/// Zero runs are found on these boundaries (absolute offsets); shorter
/// ones are not worth a chunk header.
pub const HOLE_BLOCK_BYTES: u64 = 4096;
/// Chunks in one sparse reply; past this the rest goes as one data chunk.
pub const CHUNKS_MAX: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub hole: bool,
    /// Offset from the start of the read.
    pub start: usize,
    pub len: usize,
}

/// Runs covering `data` (read at `offset`), at most CHUNKS_MAX. Returns the
/// number of runs written to `out`.
pub fn runs(data: &[u8], offset: u64, out: &mut [Run; CHUNKS_MAX]) -> usize {
    let end = offset + data.len() as u64;
    let mut count = 0;
    let mut at = offset;
    while at < end {
        let block_end = ((at / HOLE_BLOCK_BYTES + 1) * HOLE_BLOCK_BYTES).min(end);
        let whole_block = at.is_multiple_of(HOLE_BLOCK_BYTES) && block_end - at == HOLE_BLOCK_BYTES;
        let slice = &data[(at - offset) as usize..(block_end - offset) as usize];
        let hole = whole_block && is_zero(slice);
        let start = (at - offset) as usize;
        let len = (block_end - at) as usize;
        match out[..count].last_mut() {
            Some(last) if last.hole == hole => last.len += len,
            _ if count == CHUNKS_MAX => {
                // Out of chunks: the final run absorbs the rest as data.
                let last = &mut out[count - 1];
                last.hole = false;
                last.len = data.len() - last.start;
                return count;
            }
            _ => {
                out[count] = Run { hole, start, len };
                count += 1;
            }
        }
        at = block_end;
    }
    count
}

/// True if every byte is zero. ORs 64-byte chunks so the compiler can use
/// vector registers and stops at the first chunk with a set bit: data
/// blocks cost a few instructions, zero blocks a streaming pass.
fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    for chunk in &mut chunks {
        let folded =
            chunk.chunks_exact(8).fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().expect("8 bytes")));
        if folded != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = HOLE_BLOCK_BYTES as usize;

    fn run_list(data: &[u8], offset: u64) -> Vec<Run> {
        let mut out = [Run { hole: false, start: 0, len: 0 }; CHUNKS_MAX];
        let n = runs(data, offset, &mut out);
        out[..n].to_vec()
    }

    #[test]
    fn zero_blocks_become_holes_and_partial_blocks_stay_data() {
        let mut data = vec![0u8; 4 * B];
        data[B + 7] = 1;
        let r = run_list(&data, 0);
        assert_eq!(
            r,
            vec![
                Run { hole: true, start: 0, len: B },
                Run { hole: false, start: B, len: B },
                Run { hole: true, start: 2 * B, len: 2 * B },
            ]
        );
        // Unaligned start: the first partial block is data even if zero
        // (here it merges with the data block after it).
        let r = run_list(&data[100..], 100);
        assert_eq!(r[0], Run { hole: false, start: 0, len: 2 * B - 100 });
        let zeros = vec![0u8; 3 * B];
        let r = run_list(&zeros[100..], 100);
        assert_eq!(r[0], Run { hole: false, start: 0, len: B - 100 });
        assert_eq!(r[1], Run { hole: true, start: B - 100, len: 2 * B });
        assert_eq!(r.iter().map(|x| x.len).sum::<usize>(), 3 * B - 100);
    }

    #[test]
    fn chunk_count_is_capped_and_covers_everything() {
        let mut data = vec![0u8; 64 * B];
        for block in (0..64).step_by(2) {
            data[block * B] = 1;
        }
        let r = run_list(&data, 0);
        assert_eq!(r.len(), CHUNKS_MAX);
        assert!(!r.last().unwrap().hole);
        assert_eq!(r.iter().map(|x| x.len).sum::<usize>(), 64 * B);
        for pair in r.windows(2) {
            assert_eq!(pair[0].start + pair[0].len, pair[1].start, "consecutive");
        }
    }

    #[test]
    fn zero_check_sees_a_single_set_bit_anywhere() {
        let mut block = vec![0u8; B + 13];
        assert!(is_zero(&block));
        for at in [0, 7, 63, 64, 1000, B - 1, B + 12] {
            block[at] = 0x80;
            assert!(!is_zero(&block), "bit at {at}");
            block[at] = 0;
        }
    }

    #[test]
    fn all_data_is_one_run() {
        let data = vec![7u8; 3 * B + 5];
        assert_eq!(run_list(&data, 0), vec![Run { hole: false, start: 0, len: 3 * B + 5 }]);
    }
}
