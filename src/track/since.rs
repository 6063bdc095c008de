//! Bitmaps of "changed since checkpoint C", one bit per granule, kept for
//! the checkpoints clients map.
//!
//! The era map answers "changed since C" for every checkpoint, but only by
//! looking at every granule (a u32 each). A client mapping one checkpoint
//! wants its bit per granule, which a word scan finds 64 granules at a
//! time. So the first map of a checkpoint builds its bitmap from the eras
//! (one pass), and from then on marking keeps it current: a granule marked
//! in a new era gets its bit in every bitmap of a checkpoint it had not
//! changed since. That happens once per granule per era, on the path that
//! already stores the era, so writes in the steady state never see it.
//! Deleting a checkpoint frees its bitmap (2 MiB per TiB at 64 KiB
//! granules).
//!
//! Correctness while a bitmap is built concurrently with marks: it is
//! registered (empty) before the eras are scanned, so a mark either comes
//! after the registration and sets the bit itself, or came before it and
//! its era is visible to the scan (a mark stores the era before it takes
//! the registry's read lock, and the scan starts after the registry's write
//! lock was released).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::proto::reply::{DescriptorFormat, Encoded};

pub struct SinceBitmap {
    /// Bits are set for granules whose era is above this.
    pub since: u32,
    words: Box<[AtomicU64]>,
    /// Bits set (bits are never cleared): how dense the map is, which
    /// decides how [`Self::encode`] walks it.
    set_bits: AtomicUsize,
}

/// A word with this many run ends or more is written with whole blocks of
/// descriptor slots (see [`SinceBitmap::encode`]).
const DENSE_RUN_ENDS_PER_WORD: usize = 4;
/// Descriptor slots written per block in dense maps.
const BLOCK_SLOTS: usize = 8;

impl SinceBitmap {
    fn new(since: u32, granules: usize) -> Self {
        let words = (0..granules.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { since, words, set_bits: AtomicUsize::new(0) }
    }

    pub fn set(&self, granule: usize) {
        let bit = 1 << (granule % 64);
        if self.words[granule / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            self.set_bits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a word of this map is expected to hold at least
    /// [`DENSE_RUN_ENDS_PER_WORD`] run ends: with a fraction `p` of the
    /// granules set at scattered places, a word holds about 128·p·(1−p).
    /// Clustered changes have fewer run ends than that, and then the dense
    /// walk costs a little more per word than it needs to, on a map that
    /// is short anyway.
    fn looks_dense(&self) -> bool {
        let granules = (self.words.len() * 64) as f64;
        let p = self.set_bits.load(Ordering::Relaxed) as f64 / granules;
        128.0 * p * (1.0 - p) >= DENSE_RUN_ENDS_PER_WORD as f64
    }

    pub fn get(&self, granule: usize) -> bool {
        self.words[granule / 64].load(Ordering::Relaxed) & (1 << (granule % 64)) != 0
    }

    /// The runs of equal bits in `[from, to)`, in order, each as `(end,
    /// bit)` with `end` the granule after it.
    ///
    /// Runs are found from each word's transition bits (where a granule
    /// differs from the one before it), so the walk branches once per word
    /// and once per run end, not once per granule: scattered changes make
    /// run ends unpredictable, and a map costs little more than a pass over
    /// the words.
    pub fn runs(&self, from: usize, to: usize) -> Runs<'_> {
        let mut runs =
            Runs { words: &self.words, word: from / 64, to, transitions: 0, carry: 0, bit: false, done: from >= to };
        if !runs.done {
            runs.bit = self.get(from);
            runs.load();
            // The run in progress starts at `from`; only later ends count.
            runs.transitions &= u64::MAX.checked_shl((from % 64 + 1) as u32).unwrap_or(0);
        }
        runs
    }

    /// Writes the bytes `[offset, end)` straight as block-status
    /// descriptors in format `F`: one per run of equal bits of the granules
    /// (`1 << granule_shift` bytes each) it touches, status `set_status`
    /// where the bits are set and 0 elsewhere, at most `extents_max` of
    /// them and no more than `out` holds. The answer is the one
    /// [`Self::runs`] gives, without the list of extents in between: a map
    /// of scattered changes is one descriptor per run end, so building and
    /// re-reading a list was most of its cost.
    ///
    /// Run ends are found from each word's transition bits (where a
    /// granule differs from the one before it). In a sparse map a word's
    /// few run ends are written one by one. In a dense one (several run
    /// ends per word: see [`Self::looks_dense`]) the loop that stops after
    /// a word's last run end was mispredicted at nearly every word, so a
    /// word with [`DENSE_RUN_ENDS_PER_WORD`] or more is written in blocks
    /// of [`BLOCK_SLOTS`] slots with no test per slot: the slots past its
    /// last run end hold garbage that the next word's descriptors (or
    /// nothing that is sent) overwrite. On a 50,000-change map of 64 GiB
    /// that took encoding from 26-29% to 22% of the server's samples, and
    /// a map from 0.537 to 0.500 ms of server CPU (doc/benchmarks.md).
    pub fn encode<F: DescriptorFormat>(
        &self,
        offset: u64,
        end: u64,
        granule_shift: u32,
        set_status: u32,
        extents_max: usize,
        out: &mut [u8],
    ) -> Encoded {
        // The walk counts each word's run ends; the baseline x86-64 target
        // has no POPCNT and spells it out in a dozen instructions (about a
        // fifth of the walk's samples in perf annotate), so where the CPU
        // has it a copy compiled for it runs.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: the copy is compiled for POPCNT only, which the CPU
            // was just found to have.
            return unsafe { self.encode_popcnt::<F>(offset, end, granule_shift, set_status, extents_max, out) };
        }
        self.encode_walk::<F>(offset, end, granule_shift, set_status, extents_max, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    fn encode_popcnt<F: DescriptorFormat>(
        &self,
        offset: u64,
        end: u64,
        granule_shift: u32,
        set_status: u32,
        extents_max: usize,
        out: &mut [u8],
    ) -> Encoded {
        self.encode_walk::<F>(offset, end, granule_shift, set_status, extents_max, out)
    }

    #[inline(always)]
    fn encode_walk<F: DescriptorFormat>(
        &self,
        offset: u64,
        end: u64,
        granule_shift: u32,
        set_status: u32,
        extents_max: usize,
        out: &mut [u8],
    ) -> Encoded {
        let max = extents_max.min(out.len() / F::BYTES);
        if offset >= end || max == 0 {
            return Encoded { count: 0, bytes: 0 };
        }
        let dense = self.looks_dense();
        let from = (offset >> granule_shift) as usize;
        let to = ((end - 1) >> granule_shift) as usize + 1;
        let last_word = (to - 1) / 64;
        let mut index = from / 64;
        let mut word = self.words[index].load(Ordering::Relaxed);
        let mut bit = (word >> (from % 64)) & 1;
        // Transitions at or before `from` belong to the run in progress.
        let mut transitions = (word ^ (word << 1)) & !(2u64 << (from % 64)).wrapping_sub(1);
        let (mut at, mut count) = (offset, 0usize);
        let statuses = [0, set_status];
        loop {
            if index == last_word && !to.is_multiple_of(64) {
                transitions &= (1u64 << (to % 64)) - 1;
            }
            let ends = transitions.count_ones() as usize;
            if dense && ends >= DENSE_RUN_ENDS_PER_WORD && count + 64 + BLOCK_SLOTS <= max {
                // Room for every run end of the word plus a block's slack.
                let base = ((index * 64) as u64) << granule_shift;
                let (mut t, mut b, mut previous) = (transitions, bit as usize, at);
                let window = &mut out[count * F::BYTES..(count + 64 + BLOCK_SLOTS) * F::BYTES];
                let mut slot = 0;
                loop {
                    for _ in 0..BLOCK_SLOTS {
                        // Past the last run end t is 0 and this writes garbage.
                        let stop = base + (u64::from(t.trailing_zeros()) << granule_shift);
                        F::put(&mut window[slot * F::BYTES..], stop.wrapping_sub(previous), statuses[b & 1]);
                        previous = stop;
                        b ^= 1;
                        t &= t.wrapping_sub(1);
                        slot += 1;
                    }
                    if t == 0 {
                        break;
                    }
                }
                at = base + (u64::from(63 - transitions.leading_zeros()) << granule_shift);
                count += ends;
                bit ^= (ends & 1) as u64;
            } else {
                while transitions != 0 {
                    let stop = ((index * 64 + transitions.trailing_zeros() as usize) as u64) << granule_shift;
                    F::put(&mut out[count * F::BYTES..], stop - at, statuses[bit as usize]);
                    count += 1;
                    if count == max {
                        return Encoded { count: count as u32, bytes: count * F::BYTES };
                    }
                    at = stop;
                    bit ^= 1;
                    transitions &= transitions - 1;
                }
            }
            if index == last_word {
                break;
            }
            index += 1;
            let carry = word >> 63;
            word = self.words[index].load(Ordering::Relaxed);
            transitions = word ^ ((word << 1) | carry);
        }
        F::put(&mut out[count * F::BYTES..], end - at, statuses[bit as usize]);
        Encoded { count: count as u32 + 1, bytes: (count + 1) * F::BYTES }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

/// See [`SinceBitmap::runs`].
pub struct Runs<'a> {
    words: &'a [AtomicU64],
    /// The word `transitions` came from.
    word: usize,
    to: usize,
    /// Run ends still to report in `word`.
    transitions: u64,
    /// The last bit of the word before `word`.
    carry: u64,
    /// The bit of the run in progress.
    bit: bool,
    done: bool,
}

impl Runs<'_> {
    fn load(&mut self) {
        let word = self.words[self.word].load(Ordering::Relaxed);
        self.transitions = word ^ ((word << 1) | self.carry);
        self.carry = word >> 63;
        if self.word == (self.to - 1) / 64 && !self.to.is_multiple_of(64) {
            self.transitions &= (1u64 << (self.to % 64)) - 1;
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = (usize, bool);

    fn next(&mut self) -> Option<(usize, bool)> {
        if self.done {
            return None;
        }
        while self.transitions == 0 {
            if self.word == (self.to - 1) / 64 {
                self.done = true;
                return Some((self.to, self.bit));
            }
            self.word += 1;
            self.load();
        }
        let end = self.word * 64 + self.transitions.trailing_zeros() as usize;
        self.transitions &= self.transitions - 1;
        let bit = self.bit;
        self.bit = !bit;
        Some((end, bit))
    }
}

/// The bitmaps kept, and the lock that keeps two builds of one apart.
#[derive(Default)]
pub struct SinceIndex {
    bitmaps: RwLock<Vec<Arc<SinceBitmap>>>,
    building: Mutex<()>,
}

impl SinceIndex {
    /// A granule moved from era `old` to a newer one: it is now changed
    /// since every checkpoint it was not already changed since.
    pub fn marked(&self, granule: usize, old: u32) {
        let bitmaps = self.bitmaps.read().expect("since index lock");
        for bitmap in bitmaps.iter().filter(|b| old <= b.since) {
            bitmap.set(granule);
        }
    }

    pub fn get(&self, since: u32) -> Option<Arc<SinceBitmap>> {
        self.bitmaps.read().expect("since index lock").iter().find(|b| b.since == since).cloned()
    }

    /// The bitmap for `since`, built with `fill` (which sets the bit of
    /// every granule whose era is above `since`) if there is none yet.
    pub fn get_or_build(&self, since: u32, granules: usize, fill: impl FnOnce(&SinceBitmap)) -> Arc<SinceBitmap> {
        let _one_build = self.building.lock().expect("since build lock");
        if let Some(bitmap) = self.get(since) {
            return bitmap;
        }
        let bitmap = Arc::new(SinceBitmap::new(since, granules));
        self.bitmaps.write().expect("since index lock").push(Arc::clone(&bitmap));
        fill(&bitmap);
        bitmap
    }

    /// Frees the bitmap of a deleted checkpoint.
    pub fn forget(&self, since: u32) {
        self.bitmaps.write().expect("since index lock").retain(|b| b.since != since);
    }

    /// Memory the bitmaps take.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bitmaps.read().expect("since index lock").iter().map(|b| b.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each granule set with odds 1 in `one_in` (xorshift from `seed`):
    /// long runs and single granules both.
    fn random_bitmap(granules: usize, seed: &mut u64, one_in: u64) -> SinceBitmap {
        let b = SinceBitmap::new(1, granules);
        for g in 0..granules {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            if seed.is_multiple_of(one_in) {
                b.set(g);
            }
        }
        b
    }

    #[test]
    fn runs_match_a_bit_by_bit_walk() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            let granules = 1 + round * 7 % 400;
            let b = random_bitmap(granules, &mut seed, 1 + round as u64 % 5);
            let from = round % granules;
            let to = (from + 1 + round * 13 % granules).min(granules);
            let mut expected = Vec::new();
            for g in from..to {
                if g + 1 == to || b.get(g) != b.get(g + 1) {
                    expected.push((g + 1, b.get(g)));
                }
            }
            let got: Vec<_> = b.runs(from, to).collect();
            assert_eq!(got, expected, "granules {granules} range {from}..{to}");
        }
        assert_eq!(SinceBitmap::new(1, 200).runs(5, 5).count(), 0, "empty range");
    }

    #[test]
    fn encoded_descriptors_match_the_runs() {
        use crate::proto::extent::Extent;
        use crate::proto::reply::{self, Compact, Wide};
        use crate::proto::transmission::ReplyMode;
        let shift = 9;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..300 {
            let granules = 1 + round * 11 % 700;
            let b = random_bitmap(granules, &mut seed, 1 + round as u64 % 6);
            // Byte ranges that start and end mid-granule, and image ends
            // that cut the last granule short.
            let size = ((granules as u64) << shift) - (round as u64 % 3) * 100;
            let offset = (seed % size).min(size - 1);
            let end = (offset + 1 + (seed >> 20) % size).min(size);
            let cap = [1, 2, 7, 1000][round % 4];
            let mut expected = Vec::new();
            let mut at = offset;
            for (next, dirty) in b.runs((offset >> shift) as usize, ((end - 1) >> shift) as usize + 1) {
                if expected.len() == cap {
                    break;
                }
                let stop = ((next as u64) << shift).min(end);
                expected.push(Extent { length: stop - at, status: dirty as u32 * 5 });
                at = stop;
            }
            for mode in [ReplyMode::Structured, ReplyMode::Extended] {
                let mut want = vec![0u8; 16 * expected.len()];
                let want_bytes = reply::descriptors(&mut want, mode, &expected);
                let mut got = vec![0xAAu8; 16 * (granules + 2)];
                let encoded = match mode {
                    ReplyMode::Extended => b.encode::<Wide>(offset, end, shift, 5, cap, &mut got),
                    _ => b.encode::<Compact>(offset, end, shift, 5, cap, &mut got),
                };
                assert_eq!(encoded, Encoded { count: expected.len() as u32, bytes: want_bytes }, "round {round}");
                assert_eq!(got[..want_bytes], want[..want_bytes], "round {round} {mode:?}");
            }
        }
        let b = SinceBitmap::new(1, 10);
        assert_eq!(b.encode::<Compact>(0, 4096, 9, 1, 10, &mut [0u8; 7]).count, 0, "no room for one");
    }

    /// Maps dense enough for the block walk (and one sparse one), in both
    /// formats, over ranges that start and end mid-word and caps that stop
    /// the walk inside a dense word: the same descriptors as the runs.
    #[test]
    fn dense_maps_encode_like_the_runs() {
        use crate::proto::reply::{Compact, Wide};
        let shift = 16;
        let mut seed = 0x51_7cc1_b727_220au64;
        for one_in in [3, 8, 20, 200] {
            let granules = 20_000;
            let b = random_bitmap(granules, &mut seed, one_in);
            assert_eq!(b.looks_dense(), one_in <= 20, "1 in {one_in}");
            for (from, to, cap) in [(0, granules, usize::MAX), (37, 19_001, 5_000), (64, 12_800, 100), (5, 500, 73)] {
                let (offset, end) = (((from as u64) << shift) + 4096, (to as u64) << shift);
                let runs: Vec<(u64, bool)> = b
                    .runs(from, to)
                    .map(|(next, dirty)| (((next as u64) << shift).min(end), dirty))
                    .take(cap)
                    .collect();
                for wide in [false, true] {
                    let width = if wide { 16 } else { 8 };
                    let mut out = vec![0u8; width * (granules + 2)];
                    let encoded = if wide {
                        b.encode::<Wide>(offset, end, shift, 1, cap, &mut out)
                    } else {
                        b.encode::<Compact>(offset, end, shift, 1, cap, &mut out)
                    };
                    assert_eq!(encoded.count as usize, runs.len(), "1 in {one_in}, {from}..{to} cap {cap}");
                    let mut at = offset;
                    for (i, &(stop, dirty)) in runs.iter().enumerate() {
                        let slot = &out[i * width..(i + 1) * width];
                        let (length, status) = if wide {
                            (
                                u64::from_be_bytes(slot[..8].try_into().unwrap()),
                                u64::from_be_bytes(slot[8..].try_into().unwrap()),
                            )
                        } else {
                            (
                                u64::from(u32::from_be_bytes(slot[..4].try_into().unwrap())),
                                u64::from(u32::from_be_bytes(slot[4..].try_into().unwrap())),
                            )
                        };
                        assert_eq!((length, status), (stop - at, dirty as u64), "descriptor {i}, 1 in {one_in}");
                        at = stop;
                    }
                }
            }
        }
    }

    #[test]
    fn marks_reach_the_bitmaps_of_checkpoints_they_were_clean_for() {
        let index = SinceIndex::default();
        let older = index.get_or_build(2, 100, |_| {});
        let newer = index.get_or_build(5, 100, |_| {});
        index.marked(10, 3); // changed in era 3 before: already dirty since 2, not since 5
        assert!(!older.get(10) && newer.get(10));
        index.marked(11, 1);
        assert!(older.get(11) && newer.get(11));
        index.forget(2);
        assert!(index.get(2).is_none() && index.get(5).is_some());
        assert_eq!(index.bytes(), 16);
    }
}
