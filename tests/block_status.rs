//! `base:allocation` and sparse-read behaviour of file and memory exports,
//! checked against ground truth computed here with lseek(SEEK_DATA/SEEK_HOLE)
//! and FIEMAP: maps seen through nbdinfo, qemu-img and python3-libnbd, the
//! extent cache's coherence with writes on other connections and workers,
//! REQ_ONE, the descriptor cap, alignment, 64-bit descriptors and
//! BLOCK_STATUS_PAYLOAD over extended headers (a raw client below, since
//! libnbd 1.14 cannot negotiate them), OFFSET_HOLE reads and sparse copies.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// `base:allocation` statuses.
const DATA: u32 = 0;
const ZERO: u32 = 2;
const HOLE: u32 = 3;
const STATE_ZERO: u32 = 2;

// ---------------------------------------------------------------------------
// Maps: (length, status) runs from a known start, neighbours coalesced.

type Map = Vec<(u64, u32)>;

fn coalesce(runs: impl IntoIterator<Item = (u64, u32)>) -> Map {
    let mut out: Map = Vec::new();
    for (len, status) in runs {
        assert!(len > 0, "zero-length run");
        match out.last_mut() {
            Some(last) if last.1 == status => last.0 += len,
            _ => out.push((len, status)),
        }
    }
    out
}

fn covered(map: &[(u64, u32)]) -> u64 {
    map.iter().map(|r| r.0).sum()
}

/// The part of `map` (starting at `start`) inside `[from, to)`.
fn clip(map: &[(u64, u32)], start: u64, from: u64, to: u64) -> Map {
    let mut at = start;
    let mut out = vec![];
    for &(len, status) in map {
        let (s, e) = (at.max(from), (at + len).min(to));
        if s < e {
            out.push((e - s, status));
        }
        at += len;
    }
    coalesce(out)
}

/// The runs of `map` (starting at `start`) as (offset, length, status).
fn runs_at(map: &[(u64, u32)], start: u64) -> Vec<(u64, u64, u32)> {
    let mut at = start;
    map.iter()
        .map(|&(len, status)| {
            at += len;
            (at - len, len, status)
        })
        .collect()
}

/// (offset, length, status) triples, for readable failure messages.
fn show(map: &[(u64, u32)], start: u64) -> String {
    let mut at = start;
    let mut s = String::new();
    for &(len, status) in map {
        s += &format!("\n  {at:>14} +{len:<14} {status}");
        at += len;
    }
    s
}

// ---------------------------------------------------------------------------
// Ground truth, computed the way the server documents it: SEEK_DATA is
// authoritative for data; inside what it calls holes, FIEMAP UNWRITTEN
// extents (not DELALLOC) are ZERO, other extents DATA, gaps HOLE|ZERO.

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
const FIEMAP_COUNT: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
#[derive(Default)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; FIEMAP_COUNT],
}

const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);
const _: () = assert!(std::mem::size_of::<Fiemap>() == 32 + 56 * FIEMAP_COUNT);

/// lseek; None for ENXIO (no data / past the end).
fn seek(fd: i32, offset: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "lseek({offset}, {whence}): {e}");
        return None;
    }
    Some(r as u64)
}

/// Extents FIEMAP reports in `[start, start + length)` (one call).
fn fiemap(fd: i32, start: u64, length: u64) -> Vec<FiemapExtent> {
    let mut map = Box::<Fiemap>::default();
    map.start = start;
    map.length = length;
    map.extent_count = FIEMAP_COUNT as u32;
    // SAFETY: the kernel reads the header and writes at most extent_count extents.
    let rc = unsafe { libc::ioctl(fd, FS_IOC_FIEMAP, &mut *map as *mut Fiemap) };
    assert_eq!(rc, 0, "FIEMAP: {}", std::io::Error::last_os_error());
    map.extents[..map.mapped_extents as usize].to_vec()
}

/// Classifies `[start, end)`, which SEEK_DATA called a hole.
fn classify_hole(fd: i32, start: u64, end: u64, out: &mut Map) {
    let mut at = start;
    let mut ask = start;
    'calls: while ask < end {
        let extents = fiemap(fd, ask, end - ask);
        for e in &extents {
            let (s, t) = (e.logical.max(at), (e.logical + e.length).min(end));
            if s < t {
                if s > at {
                    out.push((s - at, HOLE));
                }
                let unwritten = e.flags & FIEMAP_EXTENT_UNWRITTEN != 0 && e.flags & FIEMAP_EXTENT_DELALLOC == 0;
                out.push((t - s, if unwritten { ZERO } else { DATA }));
                at = t;
            }
            if e.flags & FIEMAP_EXTENT_LAST != 0 {
                break 'calls;
            }
        }
        match extents.last() {
            Some(last) if extents.len() == FIEMAP_COUNT => ask = (last.logical + last.length).max(ask + 1),
            _ => break,
        }
    }
    if at < end {
        out.push((end - at, HOLE));
    }
}

/// The expected `base:allocation` map of `[start, end)` of the file at `path`.
fn ground_truth(path: &Path, start: u64, end: u64) -> Map {
    let file = File::open(path).unwrap();
    let fd = file.as_raw_fd();
    let mut out = vec![];
    let mut at = start;
    while at < end {
        let data = seek(fd, at, libc::SEEK_DATA).unwrap_or(end).min(end);
        if data > at {
            classify_hole(fd, at, data, &mut out);
            at = data;
        } else {
            let hole = seek(fd, at, libc::SEEK_HOLE).expect("SEEK_HOLE inside the file").min(end);
            assert!(hole > at, "SEEK_HOLE did not move from {at}");
            out.push((hole - at, DATA));
            at = hole;
        }
    }
    coalesce(out)
}

fn file_truth(path: &Path) -> Map {
    ground_truth(path, 0, std::fs::metadata(path).unwrap().len())
}

// ---------------------------------------------------------------------------
// Crafting files.

/// Random bytes, never zero (so no block of them reads as a hole).
fn nonzero_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&(rng.next() | 0x0101_0101_0101_0101).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn create(path: &Path, size: u64) -> File {
    let f = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(path).unwrap();
    f.set_len(size).unwrap();
    f
}

fn put_data(f: &File, offset: u64, len: u64) {
    f.write_all_at(&nonzero_bytes(len as usize, offset ^ len), offset).unwrap();
}

/// fallocate(KEEP_SIZE): allocated, unwritten, reads as zeroes.
fn preallocate(f: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on an open, writable file.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
}

/// A 64 MiB + 1234 byte file (unaligned tail): data runs from 4 KiB to
/// 8 MiB, holes, fallocated ranges (pure, with data inside, overlapping
/// data, past EOF), written back with fsync.
fn crafted_file(path: &Path) -> u64 {
    let size = 64 * MIB + 1234;
    let f = create(path, size);
    for (offset, len) in [
        (0, 4 * KIB),
        (12 * KIB, 8 * KIB),
        (64 * KIB, 12 * KIB),
        (MIB + 4 * KIB, 64 * KIB),
        (3 * MIB, 100 * KIB),
        (5 * MIB, MIB),
        (9 * MIB + 8 * KIB, 3 * MIB),
        (16 * MIB, 8 * MIB),
        (32 * MIB, 4 * KIB),
        (40 * MIB, 4 * KIB),
        (40 * MIB + 8 * KIB, 4 * KIB),
        (44 * MIB + 512, 3000),
        (size - 8 * KIB - 1234, 8 * KIB + 1234),
    ] {
        put_data(&f, offset, len);
    }
    preallocate(&f, 30 * MIB, 2 * MIB); // ends where the data at 32 MiB starts
    preallocate(&f, 35 * MIB, 4 * MIB);
    put_data(&f, 36 * MIB, 64 * KIB); // data inside the fallocated range
    preallocate(&f, 23 * MIB, 2 * MIB); // overlaps the end of the 8 MiB run
    preallocate(&f, 50 * MIB, 4 * KIB);
    preallocate(&f, 64 * MIB + 4 * KIB, MIB); // past EOF: invisible
    f.sync_all().unwrap();
    size
}

/// Buffered writes left unsynced (delayed allocation), holes, no fallocate.
fn delalloc_file(path: &Path) -> u64 {
    let size = 16 * MIB;
    let f = create(path, size);
    for (offset, len) in [(0, 64 * KIB), (MIB, 4 * KIB), (7 * MIB + 4 * KIB, MIB + 100), (15 * MIB, MIB)] {
        put_data(&f, offset, len);
    }
    size
}

/// A 64 GiB sparse file with a few data extents and one fallocated range.
fn huge_sparse_file(path: &Path) -> u64 {
    let size = 64 * GIB;
    let f = create(path, size);
    for (offset, len) in [(0, 64 * KIB), (5 * GIB + 4 * KIB, MIB), (33 * GIB, 4 * KIB), (size - 64 * KIB, 64 * KIB)] {
        put_data(&f, offset, len);
    }
    preallocate(&f, 40 * GIB, MIB);
    f.sync_all().unwrap();
    size
}

/// Many small extents: 4 KiB data every other block in places, fallocated
/// islands, long holes.
fn fragmented_file(path: &Path, size: u64, seed: u64) -> u64 {
    let f = create(path, size);
    let mut rng = Rng(seed);
    let mut at = 0;
    while at < size {
        let len = (1 + rng.below(16)) * 4 * KIB;
        let len = len.min(size - at);
        match rng.below(4) {
            0 | 1 => put_data(&f, at, len),
            2 => preallocate(&f, at, len),
            _ => {}
        }
        at += len + (1 + rng.below(8)) * 4 * KIB;
    }
    f.sync_all().unwrap();
    size
}

// ---------------------------------------------------------------------------
// A minimal JSON reader for nbdinfo's and qemu-img's output.

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Json {
        let bytes = text.as_bytes();
        let mut at = 0;
        let value = Self::value(bytes, &mut at);
        Self::ws(bytes, &mut at);
        assert_eq!(at, bytes.len(), "trailing text after JSON:\n{text}");
        value
    }

    fn ws(b: &[u8], at: &mut usize) {
        while *at < b.len() && b[*at].is_ascii_whitespace() {
            *at += 1;
        }
    }

    fn value(b: &[u8], at: &mut usize) -> Json {
        Self::ws(b, at);
        let rest = &b[*at..];
        let lit = |w: &str, v: Json, at: &mut usize| {
            assert!(rest.starts_with(w.as_bytes()), "bad JSON at byte {at}");
            *at += w.len();
            v
        };
        match rest.first().copied().expect("JSON ended early") {
            b'n' => lit("null", Json::Null, at),
            b't' => lit("true", Json::Bool(true), at),
            b'f' => lit("false", Json::Bool(false), at),
            b'"' => {
                *at += 1;
                let start = *at;
                while b[*at] != b'"' {
                    assert_ne!(b[*at], b'\\', "escapes are not expected here");
                    *at += 1;
                }
                *at += 1;
                Json::Str(String::from_utf8(b[start..*at - 1].to_vec()).unwrap())
            }
            b'[' => {
                *at += 1;
                let mut items = vec![];
                Self::ws(b, at);
                if b[*at] == b']' {
                    *at += 1;
                    return Json::Arr(items);
                }
                loop {
                    items.push(Self::value(b, at));
                    Self::ws(b, at);
                    *at += 1;
                    match b[*at - 1] {
                        b',' => continue,
                        b']' => return Json::Arr(items),
                        c => panic!("bad JSON array separator {:?}", c as char),
                    }
                }
            }
            b'{' => {
                *at += 1;
                let mut fields = vec![];
                loop {
                    let Json::Str(key) = Self::value(b, at) else { panic!("JSON object key is not a string") };
                    Self::ws(b, at);
                    assert_eq!(b[*at], b':', "JSON object without ':'");
                    *at += 1;
                    fields.push((key, Self::value(b, at)));
                    Self::ws(b, at);
                    *at += 1;
                    match b[*at - 1] {
                        b',' => continue,
                        b'}' => return Json::Obj(fields),
                        c => panic!("bad JSON object separator {:?}", c as char),
                    }
                }
            }
            c if c == b'-' || c.is_ascii_digit() => {
                let start = *at;
                while *at < b.len() && matches!(b[*at], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    *at += 1;
                }
                Json::Num(String::from_utf8(b[start..*at].to_vec()).unwrap())
            }
            c => panic!("unexpected JSON byte {:?}", c as char),
        }
    }

    fn get(&self, key: &str) -> &Json {
        let Json::Obj(fields) = self else { panic!("not a JSON object: {self:?}") };
        &fields.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no {key:?} in {self:?}")).1
    }

    fn u64(&self, key: &str) -> u64 {
        match self.get(key) {
            Json::Num(n) => n.parse().unwrap_or_else(|_| panic!("{key} = {n} is not a u64")),
            other => panic!("{key} is not a number: {other:?}"),
        }
    }

    fn bool(&self, key: &str) -> bool {
        match self.get(key) {
            Json::Bool(b) => *b,
            other => panic!("{key} is not a boolean: {other:?}"),
        }
    }

    fn str(&self, key: &str) -> &str {
        match self.get(key) {
            Json::Str(s) => s,
            other => panic!("{key} is not a string: {other:?}"),
        }
    }

    fn items(&self) -> &[Json] {
        let Json::Arr(items) = self else { panic!("not a JSON array: {self:?}") };
        items
    }
}

/// Checks that `(offset, length)` entries tile `[0, size)` in order, and
/// returns the coalesced map.
fn tiled_map(what: &str, entries: impl IntoIterator<Item = (u64, u64, u32)>, size: u64) -> Map {
    let mut at = 0;
    let mut runs = vec![];
    for (offset, length, status) in entries {
        assert_eq!(offset, at, "{what}: entries not consecutive");
        runs.push((length, status));
        at += length;
    }
    assert_eq!(at, size, "{what}: entries do not cover the export");
    coalesce(runs)
}

/// `nbdinfo --map --json`: `[{"offset","length","type","description"}...]`.
fn nbdinfo_map(uri: &str, size: u64) -> Map {
    let json = Json::parse(&run_ok("nbdinfo", &["--map", "--json", uri]));
    let entries: Vec<_> = json
        .items()
        .iter()
        .map(|e| {
            let status = e.u64("type") as u32;
            let expected = match status {
                DATA => "data",
                ZERO => "zero",
                HOLE => "hole,zero",
                other => panic!("nbdinfo shows status {other}"),
            };
            assert_eq!(e.str("description"), expected, "nbdinfo description of type {status}");
            (e.u64("offset"), e.u64("length"), status)
        })
        .collect();
    tiled_map("nbdinfo --map --json", entries, size)
}

/// `qemu-img map --output=json`: qemu's `data` is "not HOLE" and `zero` is ZERO.
fn qemu_map(uri: &str, size: u64) -> Map {
    let json = Json::parse(&run_ok("qemu-img", &["map", "--output=json", "-f", "raw", uri]));
    let entries: Vec<_> = json
        .items()
        .iter()
        .map(|e| {
            assert!(e.bool("present"), "qemu-img map: {e:?} not present");
            assert_eq!(e.u64("depth"), 0, "qemu-img map depth");
            let status = if e.bool("data") { 0 } else { 1 } | if e.bool("zero") { STATE_ZERO } else { 0 };
            (e.u64("start"), e.u64("length"), status)
        })
        .collect();
    // qemu rounds the image size up to whole 512-byte sectors: the last
    // entry may run past an unaligned end.
    let rounded = size.next_multiple_of(512);
    let map = tiled_map("qemu-img map", entries, rounded);
    clip(&map, 0, 0, size)
}

/// python3-libnbd: BLOCK_STATUS requests of at most `step` bytes from 0
/// (each continuing where the previous reply ended). Prints one line per
/// reply: `reply OFFSET LENGTH len status len status...`.
const PY_MAP: &str = r#"
import nbd, sys
uri, step, flags = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.can_meta_context("base:allocation")
size = h.get_size()
print("size", size)
off = 0
while off < size:
    n = min(step, size - off)
    got = []
    def cb(ctx, o, entries, err):
        got.append((ctx, o, list(entries)))
        return 0
    h.block_status(n, off, cb, flags)
    assert len(got) == 1, got
    ctx, o, e = got[0]
    assert ctx == "base:allocation" and o == off, (ctx, o, off)
    print("reply", off, n, " ".join(map(str, e)))
    moved = sum(e[0::2])
    assert moved > 0
    off += moved
h.shutdown()
"#;

struct PyMap {
    size: u64,
    /// (request offset, request length, descriptors)
    replies: Vec<(u64, u64, Map)>,
}

fn python_map(uri: &str, step: u64, flags: u32) -> PyMap {
    let out = python(PY_MAP, &[uri, &step.to_string(), &flags.to_string()]);
    let mut lines = out.lines();
    let head: Vec<u64> = lines.next().unwrap().split(' ').skip(1).map(|x| x.parse().unwrap()).collect();
    let replies = lines
        .map(|line| {
            let n: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
            (n[0], n[1], n[2..].chunks(2).map(|d| (d[0], d[1] as u32)).collect())
        })
        .collect();
    PyMap { size: head[0], replies }
}

impl PyMap {
    /// Checks each reply's framing and returns the whole map.
    fn map(&self) -> Map {
        let mut at = 0;
        let mut runs = vec![];
        for (offset, length, descriptors) in &self.replies {
            assert_eq!(*offset, at);
            assert!(!descriptors.is_empty(), "reply at {offset} has no descriptors");
            assert!(descriptors.iter().all(|d| d.0 > 0), "zero-length descriptor at {offset}: {descriptors:?}");
            assert!(covered(descriptors) <= *length, "reply at {offset} overruns {length}: {descriptors:?}");
            runs.extend_from_slice(descriptors);
            at += covered(descriptors);
        }
        assert_eq!(at, self.size);
        coalesce(runs)
    }
}

fn assert_maps_equal(what: &str, got: &[(u64, u32)], expected: &[(u64, u32)], start: u64) {
    assert!(got == expected, "{what}: map differs\ngot:{}\nexpected:{}", show(got, start), show(expected, start));
}

// ---------------------------------------------------------------------------
// A raw NBD client (compact structured replies or extended headers).

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_NO_HOLE: u16 = 1 << 1;
const FLAG_DF: u16 = 1 << 2;
const FLAG_REQ_ONE: u16 = 1 << 3;
const FLAG_PAYLOAD_LEN: u16 = 1 << 5;

const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_BLOCK_STATUS: u16 = 5;
const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
const REPLY_FLAG_DONE: u16 = 1;
const EINVAL: u32 = 22;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    /// Extended headers only: the request offset, echoed.
    offset: Option<u64>,
    payload: Vec<u8>,
}

/// A whole reply: the chunks up to DONE, or a simple reply's error.
#[derive(Debug)]
struct Reply {
    error: u32,
    chunks: Vec<Chunk>,
}

/// One context's answer: (context id, descriptors).
type StatusChunk = (u32, Vec<(u64, u64)>);

struct Client {
    s: TcpStream,
    extended: bool,
    size: u64,
    tflags: u16,
    context: Option<u32>,
    min_block: Option<u32>,
    cookie: u64,
}

#[derive(Clone, Copy)]
struct Opts<'a> {
    export: &'a str,
    extended: bool,
    meta: bool,
    block_size: bool,
}

const SR: Opts = Opts { export: "", extended: false, meta: true, block_size: false };
const EH: Opts = Opts { export: "", extended: true, meta: true, block_size: false };

impl Client {
    fn connect(addr: &str, opts: Opts) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        // Generous but bounded: O_DIRECT writes into holes on a shared ext4
        // /tmp have been measured stalling 8 s in the kernel on CI-sized VMs
        // (both servers of the run at once, ring op pending, device idle), so
        // a 30 s cap turned file-system hiccups into test failures.
        s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
        let mut c =
            Client { s, extended: opts.extended, size: 0, tflags: 0, context: None, min_block: None, cookie: 0 };
        let g = c.recv(18);
        assert_eq!((be64(&g), be64(&g[8..])), (NBDMAGIC, IHAVEOPT), "greeting");
        assert_eq!(be16(&g[16..]) & 3, 3, "fixed newstyle + no zeroes");
        c.send(&3u32.to_be_bytes());
        let mode = if opts.extended { OPT_EXTENDED_HEADERS } else { OPT_STRUCTURED_REPLY };
        c.option(mode, &[]);
        let (reply, _) = c.option_reply(mode);
        assert_eq!(reply, REP_ACK, "structured replies / extended headers refused");
        if opts.meta {
            let query = b"base:allocation";
            let mut data = vec![];
            data.extend_from_slice(&(opts.export.len() as u32).to_be_bytes());
            data.extend_from_slice(opts.export.as_bytes());
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&(query.len() as u32).to_be_bytes());
            data.extend_from_slice(query);
            c.option(OPT_SET_META_CONTEXT, &data);
            loop {
                match c.option_reply(OPT_SET_META_CONTEXT) {
                    (REP_META_CONTEXT, d) => {
                        assert_eq!(&d[4..], query, "context name");
                        assert!(c.context.is_none(), "two contexts for one query");
                        c.context = Some(be32(&d));
                    }
                    (REP_ACK, _) => break,
                    (other, _) => panic!("SET_META_CONTEXT reply {other:#x}"),
                }
            }
            assert!(c.context.is_some(), "base:allocation not selected");
        }
        let mut data = vec![];
        data.extend_from_slice(&(opts.export.len() as u32).to_be_bytes());
        data.extend_from_slice(opts.export.as_bytes());
        if opts.block_size {
            data.extend_from_slice(&1u16.to_be_bytes());
            data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        } else {
            data.extend_from_slice(&0u16.to_be_bytes());
        }
        c.option(OPT_GO, &data);
        loop {
            match c.option_reply(OPT_GO) {
                (REP_INFO, d) if be16(&d) == INFO_EXPORT => {
                    c.size = be64(&d[2..]);
                    c.tflags = be16(&d[10..]);
                }
                (REP_INFO, d) if be16(&d) == INFO_BLOCK_SIZE => c.min_block = Some(be32(&d[2..])),
                (REP_INFO, _) => {}
                (REP_ACK, _) => break,
                (other, _) => panic!("GO reply {other:#x}"),
            }
        }
        assert!(c.size > 0, "no NBD_INFO_EXPORT");
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap_or_else(|e| panic!("receiving {n} bytes: {e}"));
        b
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = vec![];
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let h = self.recv(20);
        assert_eq!(be64(&h), OPTION_REPLY_MAGIC);
        assert_eq!(be32(&h[8..]), option, "option echoed");
        let data = self.recv(be32(&h[16..]) as usize);
        (be32(&h[12..]), data)
    }

    /// Sends one request and reads its whole reply.
    fn request(&mut self, flags: u16, kind: u16, offset: u64, length: u64, payload: &[u8]) -> Reply {
        self.cookie += 1;
        let cookie = self.cookie;
        let mut m = Vec::with_capacity(32 + payload.len());
        m.extend_from_slice(&(if self.extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC }).to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            m.extend_from_slice(&length.to_be_bytes());
        } else {
            m.extend_from_slice(&u32::try_from(length).expect("compact length").to_be_bytes());
        }
        m.extend_from_slice(payload);
        self.send(&m);
        let mut chunks = vec![];
        loop {
            let magic = be32(&self.recv(4));
            let (flags, kind, got_cookie, echoed, len) = match magic {
                SIMPLE_REPLY_MAGIC => {
                    let h = self.recv(12);
                    assert_eq!(be64(&h[4..]), cookie, "cookie");
                    assert!(chunks.is_empty(), "simple reply after chunks");
                    return Reply { error: be32(&h), chunks };
                }
                STRUCTURED_REPLY_MAGIC if !self.extended => {
                    let h = self.recv(16);
                    (be16(&h), be16(&h[2..]), be64(&h[4..]), None, be32(&h[12..]) as u64)
                }
                EXTENDED_REPLY_MAGIC if self.extended => {
                    let h = self.recv(28);
                    (be16(&h), be16(&h[2..]), be64(&h[4..]), Some(be64(&h[12..])), be64(&h[20..]))
                }
                other => panic!("unexpected reply magic {other:#x} (extended: {})", self.extended),
            };
            assert_eq!(got_cookie, cookie, "cookie");
            let payload = self.recv(usize::try_from(len).unwrap());
            let chunk = Chunk { flags, kind, offset: echoed, payload };
            let done = flags & REPLY_FLAG_DONE != 0;
            chunks.push(chunk);
            if done {
                break;
            }
        }
        let error = chunks.iter().find(|c| c.kind & 0x8000 != 0).map_or(0, |c| be32(&c.payload));
        Reply { error, chunks }
    }

    fn expect_ok(&mut self, what: &str, flags: u16, kind: u16, offset: u64, length: u64, payload: &[u8]) -> Reply {
        let r = self.request(flags, kind, offset, length, payload);
        assert_eq!(r.error, 0, "{what} at {offset}+{length} failed");
        r
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let flags = if self.extended { FLAG_PAYLOAD_LEN } else { 0 };
        self.expect_ok("WRITE", flags, CMD_WRITE, offset, data.len() as u64, data);
    }

    fn zero(&mut self, offset: u64, length: u64, no_hole: bool) {
        self.expect_ok("WRITE_ZEROES", if no_hole { FLAG_NO_HOLE } else { 0 }, CMD_WRITE_ZEROES, offset, length, &[]);
    }

    fn trim(&mut self, offset: u64, length: u64) {
        self.expect_ok("TRIM", 0, CMD_TRIM, offset, length, &[]);
    }

    /// A READ's chunks as (offset, length, is_hole, bytes), checked to tile
    /// the request; plus the assembled bytes.
    fn read(&mut self, offset: u64, length: u64, flags: u16) -> (Vec<(u64, u64, bool)>, Vec<u8>) {
        let r = self.expect_ok("READ", flags, CMD_READ, offset, length, &[]);
        let mut buf = vec![0xa5u8; length as usize];
        let mut pieces = vec![];
        for c in &r.chunks {
            let (at, len, hole) = match c.kind {
                CHUNK_OFFSET_DATA => (be64(&c.payload), c.payload.len() as u64 - 8, false),
                CHUNK_OFFSET_HOLE => (be64(&c.payload), be32(&c.payload[8..]) as u64, true),
                CHUNK_NONE => continue,
                other => panic!("READ chunk type {other}"),
            };
            assert!(at >= offset && at + len <= offset + length && len > 0, "chunk {at}+{len} outside the read");
            let dst = &mut buf[(at - offset) as usize..(at - offset + len) as usize];
            if hole {
                dst.fill(0);
            } else {
                dst.copy_from_slice(&c.payload[8..]);
            }
            pieces.push((at, len, hole));
        }
        pieces.sort();
        let mut at = offset;
        for p in &pieces {
            assert_eq!(p.0, at, "READ chunks overlap or leave a gap: {pieces:?}");
            at += p.1;
        }
        assert_eq!(at, offset + length, "READ chunks do not cover the request: {pieces:?}");
        (pieces, buf)
    }

    /// BLOCK_STATUS: every status chunk, or the error code.
    fn block_status_raw(
        &mut self,
        offset: u64,
        length: u64,
        flags: u16,
        payload: &[u8],
    ) -> Result<Vec<StatusChunk>, u32> {
        let r = self.request(flags, CMD_BLOCK_STATUS, offset, length, payload);
        if r.error != 0 {
            return Err(r.error);
        }
        let mut out = vec![];
        for (i, c) in r.chunks.iter().enumerate() {
            assert_eq!(c.flags & REPLY_FLAG_DONE != 0, i + 1 == r.chunks.len(), "DONE only on the last chunk");
            let p = &c.payload;
            let descriptors = match c.kind {
                CHUNK_BLOCK_STATUS if !self.extended => {
                    assert_eq!((p.len() - 4) % 8, 0, "BLOCK_STATUS payload length");
                    p[4..].chunks(8).map(|d| (be32(d) as u64, be32(&d[4..]) as u64)).collect()
                }
                CHUNK_BLOCK_STATUS_EXT if self.extended => {
                    assert_eq!(c.offset, Some(offset), "extended reply echoes the request offset");
                    let count = be32(&p[4..]) as usize;
                    assert!(count > 0, "BLOCK_STATUS_EXT with count 0");
                    assert_eq!(p.len(), 8 + 16 * count, "BLOCK_STATUS_EXT payload length for {count} descriptors");
                    p[8..].chunks(16).map(|d| (be64(d), be64(&d[8..]))).collect()
                }
                other => panic!("BLOCK_STATUS chunk type {other} (extended: {})", self.extended),
            };
            out.push((be32(p), descriptors));
        }
        Ok(out)
    }

    /// BLOCK_STATUS on the one selected context; checks the reply's framing
    /// (one chunk, non-zero descriptors from `offset`, no overrun, no
    /// equal neighbours) and returns the descriptors.
    fn block_status(&mut self, offset: u64, length: u64, flags: u16) -> Map {
        let chunks = self
            .block_status_raw(offset, length, flags, &[])
            .unwrap_or_else(|e| panic!("BLOCK_STATUS {offset}+{length} failed: error {e}"));
        assert_eq!(chunks.len(), 1, "one chunk per selected context: {chunks:?}");
        let (id, descriptors) = &chunks[0];
        assert_eq!(Some(*id), self.context, "context id");
        let map: Map = descriptors.iter().map(|&(l, s)| (l, u32::try_from(s).expect("32-bit status"))).collect();
        assert!(map.iter().all(|d| d.0 > 0 && [DATA, ZERO, HOLE].contains(&d.1)), "bad descriptor: {map:?}");
        assert!(covered(&map) <= length, "reply {offset}+{length} overruns:{}", show(&map, offset));
        assert!(map.windows(2).all(|w| w[0].1 != w[1].1), "equal neighbours not merged:{}", show(&map, offset));
        map
    }

    /// Maps `[offset, end)` with as many requests as it takes.
    fn map_range(&mut self, offset: u64, end: u64) -> Map {
        let mut runs = vec![];
        let mut at = offset;
        while at < end {
            let step = (end - at).min(if self.extended { u64::MAX } else { 1 << 31 });
            let m = self.block_status(at, step, 0);
            at += covered(&m);
            runs.extend(m);
        }
        coalesce(runs)
    }

    fn disconnect(mut self) {
        self.cookie += 1;
        let mut m = vec![];
        m.extend_from_slice(&(if self.extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC }).to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_DISC.to_be_bytes());
        m.extend_from_slice(&self.cookie.to_be_bytes());
        m.extend_from_slice(&[0u8; 8]);
        m.extend_from_slice(if self.extended { &[0u8; 8][..] } else { &[0u8; 4][..] });
        self.send(&m);
    }
}

// ---------------------------------------------------------------------------
// 1. Ground truth through nbdinfo, qemu-img and python3-libnbd.

#[test]
fn maps_match_ground_truth_through_three_clients() {
    if !require("nbdinfo") || !require("qemu-img") || !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("bs-truth");
    let files = [
        ("crafted", crafted_file(&dir.path("crafted"))),
        ("delalloc", delalloc_file(&dir.path("delalloc"))),
        ("huge", huge_sparse_file(&dir.path("huge"))),
    ];
    let specs: Vec<String> = files.iter().map(|(n, _)| format!("{n}={}", dir.path(n).display())).collect();
    let args: Vec<&str> = specs.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    for (name, size) in files {
        let path = dir.path(name);
        let expected = file_truth(&path);
        assert_eq!(covered(&expected), size);
        // Sanity of the crafted layouts: all three statuses where expected.
        let statuses: Vec<u32> = expected.iter().map(|r| r.1).collect();
        assert!(statuses.contains(&DATA) && statuses.contains(&HOLE), "{name}: {expected:?}");
        if name != "delalloc" {
            assert!(statuses.contains(&ZERO), "{name}: no fallocated range seen:{}", show(&expected, 0));
        }
        let uri = server.export_uri(name);
        assert_maps_equal(&format!("{name}: nbdinfo"), &nbdinfo_map(&uri, size), &expected, 0);
        assert_maps_equal(&format!("{name}: qemu-img"), &qemu_map(&uri, size), &expected, 0);
        let py = python_map(&uri, 1 << 31, 0);
        assert_eq!(py.size, size);
        assert_maps_equal(&format!("{name}: python3-libnbd"), &py.map(), &expected, 0);
        // Again, now answered from the extent cache.
        assert_maps_equal(
            &format!("{name}: python3-libnbd, cached"),
            &python_map(&uri, 1 << 31, 0).map(),
            &expected,
            0,
        );
        // The file is unchanged by all that.
        assert_maps_equal(&format!("{name}: ground truth after"), &file_truth(&path), &expected, 0);
    }
}

// ---------------------------------------------------------------------------
// 2. Cache coherence: mutations on one connection, maps on others.

/// Checks that every extent claiming ZERO really reads as zeroes.
fn assert_zero_claims_hold(what: &str, map: &[(u64, u32)], start: u64, bytes: &[u8]) {
    let mut at = 0usize;
    for &(len, status) in map {
        let run = &bytes[at..at + len as usize];
        if status & STATE_ZERO != 0
            && let Some(i) = run.iter().position(|&b| b != 0)
        {
            let (run_at, byte_at) = (start + at as u64, start + (at + i) as u64);
            panic!("{what}: {run_at}+{len} reported status {status} but byte {byte_at} is {:#x}", run[i]);
        }
        at += len as usize;
    }
}

fn coherence(cache: &str, seed: u64) {
    let dir = TempDir::new("bs-coherence");
    let path = dir.path("disk");
    let size = fragmented_file(&path, 24 * MIB, seed);
    // The cache is on by default; "off" is the documented `--extent-cache off`.
    let mut args = vec![path.to_str().unwrap()];
    if cache == "off" {
        args.extend(["--extent-cache", "off"]);
    }
    let server = Server::start(&args);
    let addr = server.addr();
    let mut writer = Client::connect(&addr, SR);
    // Several observers, so that some share the writer's worker and some don't.
    let mut observers: Vec<Client> = (0..4).map(|_| Client::connect(&addr, SR)).collect();
    // Meanwhile, another connection maps random ranges all the time, so scans
    // race with the mutations and their results race into the cache.
    let stop = Arc::new(AtomicBool::new(false));
    let hammered = Arc::new(AtomicU64::new(0));
    let hammer = {
        let (stop, hammered, addr) = (stop.clone(), hammered.clone(), addr.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&addr, SR);
            let mut rng = Rng(seed ^ 0x5555);
            while !stop.load(Ordering::Relaxed) {
                let offset = rng.below(size / 512) * 512;
                let length = 1 + rng.below(size - offset);
                c.block_status(offset, length, 0);
                hammered.fetch_add(1, Ordering::Relaxed);
            }
            c.disconnect();
        })
    };
    let mut rng = Rng(seed);
    let iterations = 1500;
    // 4 KiB blocks partly covered by an unaligned mutation: the server may
    // describe the rest of such a block by what it held before.
    let mut partial_blocks = std::collections::HashSet::new();
    for i in 0..iterations {
        let unaligned = rng.below(6) == 0;
        let (offset, length) = if unaligned {
            let offset = rng.below(size - 300 * KIB);
            let length = 1 + rng.below(200 * KIB);
            partial_blocks.extend([offset / (4 * KIB), (offset + length - 1) / (4 * KIB)]);
            (offset, length)
        } else {
            let offset = rng.below(size / (4 * KIB) - 64) * 4 * KIB;
            (offset, (1 + rng.below(64)) * 4 * KIB)
        };
        let end = offset + length;
        let op = rng.below(5);
        let what = match op {
            0 | 1 => {
                writer.write(offset, &nonzero_bytes(length as usize, rng.next()));
                "write"
            }
            2 => {
                writer.zero(offset, length, false);
                "zero"
            }
            3 => {
                writer.zero(offset, length, true);
                "zero NO_HOLE"
            }
            _ => {
                writer.trim(offset, length);
                "trim"
            }
        };
        let ctx = format!("iteration {i} (seed {seed}, cache {cache}): after {what} {offset}+{length}");
        let truth = ground_truth(&path, offset, end);
        let observer = &mut observers[i % 4];
        let from = offset.saturating_sub(rng.below(256 * KIB));
        let to = (end + rng.below(256 * KIB)).min(size);
        let got = observer.map_range(from, to);
        assert_eq!(covered(&got), to - from);
        let inside = clip(&got, from, offset, end);
        if what == "write" {
            assert!(inside == vec![(length, DATA)], "{ctx}: written range not all data:{}", show(&inside, offset));
        }
        assert_maps_equal(&format!("{ctx}: the mutated range"), &inside, &truth, offset);
        if cache == "off" {
            assert_maps_equal(&format!("{ctx}: the window"), &got, &ground_truth(&path, from, to), from);
        }
        let (_, bytes) = observer.read(from, to - from, 0);
        assert_zero_claims_hold(&ctx, &got, from, &bytes);
    }
    stop.store(true, Ordering::Relaxed);
    hammer.join().expect("hammer connection failed");
    assert!(hammered.load(Ordering::Relaxed) > 0);
    // In the end, over the whole export: every ZERO claim holds, and what
    // the filesystem calls data is never reported as a hole (outside blocks
    // that unaligned mutations cut through; see the alignment test).
    let final_map = observers[0].map_range(0, size);
    let (_, bytes) = observers[1].read(0, size, 0);
    assert_zero_claims_hold("final map", &final_map, 0, &bytes);
    let truth = file_truth(&path);
    for (at, len, status) in runs_at(&truth, 0) {
        if status != DATA {
            continue;
        }
        for (o, l, s) in runs_at(&clip(&final_map, 0, at, at + len), at) {
            let excused = (o / (4 * KIB)..=(o + l - 1) / (4 * KIB)).all(|b| partial_blocks.contains(&b));
            assert!(
                s != HOLE || excused,
                "final map (cache {cache}): data at {o}+{l} reported as a hole:{}\nfilesystem:{}",
                show(&clip(&final_map, 0, at, at + len), at),
                show(&clip(&truth, 0, at, at + len), at)
            );
        }
    }
    writer.disconnect();
}

#[test]
fn cache_coherent_across_connections_and_workers() {
    coherence("on", 0xC0FFEE);
}

#[test]
fn coherent_without_cache() {
    coherence("off", 0xBADCAB);
}

// ---------------------------------------------------------------------------
// 3. REQ_ONE.

/// One REQ_ONE request: exactly one descriptor, within the request and
/// within the true run at `offset`.
fn check_req_one(c: &mut Client, truth: &[(u64, u32)], offset: u64, length: u64, what: &str) {
    let m = c.block_status(offset, length, FLAG_REQ_ONE);
    assert_eq!(m.len(), 1, "{what}: REQ_ONE at {offset}+{length} gave{}", show(&m, offset));
    let (len, status) = m[0];
    assert!(len <= length, "{what}: REQ_ONE descriptor {len} longer than the request {length}");
    let expected = clip(truth, 0, offset, offset + len);
    assert_eq!(expected, vec![(len, status)], "{what}: REQ_ONE at {offset}+{length}: got {len} bytes of {status}");
}

#[test]
fn req_one_returns_exactly_one_extent() {
    let dir = TempDir::new("bs-reqone");
    let path = dir.path("file");
    let f = create(&path, 8 * MIB);
    put_data(&f, MIB, 256 * KIB);
    preallocate(&f, 4 * MIB, MIB);
    f.sync_all().unwrap();
    drop(f);
    let server = Server::start(&[&format!("file={}", path.display()), "mem=memory:8M"]);
    let addr = server.addr();

    // Memory: 64 KiB pages, written ones data.
    let mut mem = Client::connect(&addr, Opts { export: "mem", ..SR });
    mem.write(MIB, &nonzero_bytes(128 * KIB as usize, 1));
    mem.write(3 * MIB + 10, &[7u8; 100]);
    let mem_truth = coalesce([
        (MIB, HOLE),
        (128 * KIB, DATA),
        (2 * MIB - 128 * KIB, HOLE),
        (64 * KIB, DATA),
        (5 * MIB - 64 * KIB, HOLE),
    ]);
    assert_maps_equal("memory map", &mem.map_range(0, 8 * MIB), &mem_truth, 0);

    let file_truth = file_truth(&path);
    assert_eq!(
        file_truth,
        vec![(MIB, HOLE), (256 * KIB, DATA), (3 * MIB - 256 * KIB, HOLE), (MIB, ZERO), (3 * MIB, HOLE)]
    );
    let mut file = Client::connect(&addr, Opts { export: "file", ..SR });
    // (offset, length): inside data, inside holes, straddling boundaries,
    // shorter than the run, and the whole export.
    let probes = [
        (MIB + 4 * KIB, 8 * KIB),
        (MIB, 8 * MIB - MIB),
        (MIB + 100, 200 * KIB),
        (0, 512),
        (100, 8 * MIB - 100),
        (2 * MIB, 64 * KIB),
        (MIB - 64 * KIB, 128 * KIB),
        (MIB + 192 * KIB, 128 * KIB),
        (3 * MIB, 2 * MIB),
        (4 * MIB + 4096, 4096),
        (5 * MIB - 4096, 8192),
        (0, 8 * MIB),
        (8 * MIB - 1, 1),
    ];
    for round in ["cold", "cached"] {
        for &(offset, length) in &probes {
            check_req_one(&mut file, &file_truth, offset, length, &format!("file ({round})"));
            check_req_one(&mut mem, &mem_truth, offset, length, "memory");
        }
    }
    // Same over extended headers (64-bit descriptors).
    let mut ext = Client::connect(&addr, Opts { export: "file", ..EH });
    for &(offset, length) in &probes {
        check_req_one(&mut ext, &file_truth, offset, length, "file (extended)");
    }
}

// ---------------------------------------------------------------------------
// 4. The descriptor cap.

#[test]
fn descriptor_cap_splits_maps_into_follow_up_requests() {
    let dir = TempDir::new("bs-cap");
    let path = dir.path("frag");
    let size = fragmented_file(&path, 8 * MIB + 4 * KIB, 77);
    let truth = file_truth(&path);
    assert!(truth.len() > 100, "want many extents, got {}", truth.len());
    let server = Server::start(&["--max-extents", "4", path.to_str().unwrap()]);
    let mut c = Client::connect(&server.addr(), SR);
    let mut rng = Rng(4);

    // Walks [from, size) with requests of `len(at)` bytes, each continuing
    // from the end of the previous reply.
    let walk = |c: &mut Client, from: u64, flags: u16, len: &mut dyn FnMut(u64) -> u64, what: &str| {
        let mut at = from;
        let mut runs = vec![];
        let mut replies = 0;
        while at < size {
            let length = len(at).clamp(1, size - at);
            let m = c.block_status(at, length, flags);
            let cap = if flags & FLAG_REQ_ONE != 0 { 1 } else { 4 };
            assert!(m.len() <= cap, "{what}: {} descriptors at {at}+{length}", m.len());
            let got = covered(&m);
            if got < length {
                assert_eq!(m.len(), cap, "{what}: short reply at {at}+{length} below the cap:{}", show(&m, at));
            }
            assert_maps_equal(&format!("{what}: reply at {at}+{length}"), &m, &clip(&truth, 0, at, at + got), at);
            runs.extend(m);
            at += got;
            replies += 1;
        }
        assert_maps_equal(what, &coalesce(runs), &clip(&truth, 0, from, size), from);
        replies
    };
    let whole = |at: u64| size - at;
    let replies = walk(&mut c, 0, 0, &mut { whole }, "cold walk");
    assert!(replies >= truth.len() / 4, "{replies} replies for {} extents", truth.len());
    walk(&mut c, 0, 0, &mut { whole }, "cached walk");
    // A fresh server: the cache is filled patchily by random requests first,
    // so later replies mix cached prefixes with scans.
    drop(c);
    drop(server);
    let server = Server::start(&["--max-extents", "4", path.to_str().unwrap()]);
    let mut c = Client::connect(&server.addr(), SR);
    for _ in 0..60 {
        let from = rng.below(size);
        let mut len = |_| 1 + rng.below(512 * KIB);
        walk(&mut c, from, 0, &mut len, "random-length walk");
        if from > size / 2 {
            walk(&mut c, from, FLAG_REQ_ONE, &mut { whole }, "REQ_ONE walk");
        }
    }
    walk(&mut c, 0, 0, &mut { whole }, "walk after random requests");
    let mut ext = Client::connect(&server.addr(), EH);
    walk(&mut ext, 0, 0, &mut { whole }, "extended walk");
}

// ---------------------------------------------------------------------------
// 5. Alignment to the advertised minimum block size.

const PY_BOUNDARIES: &str = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
size, minimum = h.get_size(), h.get_block_size(nbd.SIZE_MINIMUM)
print(minimum)
off = 0
while off < size:
    got = []
    h.block_status(size - off, off, lambda ctx, o, e, err: got.extend(e) or 0)
    for length in got[0::2]:
        off += length
        print(off)
"#;

/// Every descriptor end libnbd sees, with the minimum block size.
fn boundaries(uri: &str) -> (u64, Vec<u64>) {
    let out = python(PY_BOUNDARIES, &[uri]);
    let mut n = out.lines().map(|l| l.trim().parse::<u64>().unwrap());
    (n.next().unwrap(), n.collect())
}

#[test]
fn descriptors_are_aligned_to_the_minimum_block_size() {
    if !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("bs-align");
    let path = dir.path("direct");
    let size = fragmented_file(&path, 4 * MIB, 9);
    assert_eq!(size % 4096, 0);
    // By default any alignment is served and the minimum is 1; with
    // --strict-alignment the O_DIRECT alignment is the minimum. Either way
    // descriptors fall on 512-byte boundaries and on the minimum.
    for strict in [false, true] {
        let mut args = vec![path.to_str().unwrap()];
        if strict {
            args.push("--strict-alignment");
        }
        let server = Server::start(&args);
        let uri = server.tcp_uri.clone().unwrap();
        let check = |when: &str| {
            let (minimum, ends) = boundaries(&uri);
            if strict {
                assert!(minimum >= 512 && minimum.is_power_of_two(), "strict O_DIRECT export advertises {minimum}");
            } else {
                assert_eq!(minimum, 1, "any alignment by default");
            }
            let align = minimum.max(512);
            assert_eq!(ends.last(), Some(&size));
            for (i, &end) in ends[..ends.len() - 1].iter().enumerate() {
                let near = &ends[i.saturating_sub(2)..(i + 3).min(ends.len())];
                assert_eq!(
                    end % align,
                    0,
                    "{when}: descriptor boundary {end} is not a multiple of {align} (ends {near:?})"
                );
            }
            ends.len()
        };
        assert!(check("fresh") > 20);
        // A client that did not agree to the block size may write and zero
        // unaligned ranges (the server read-modify-writes them); the map must
        // still be in whole blocks.
        let mut c = Client::connect(&server.addr(), SR);
        let holes: Vec<u64> = runs_at(&file_truth(&path), 0)
            .into_iter()
            .filter(|r| r.2 == HOLE && r.1 >= 16 * KIB)
            .map(|r| r.0)
            .take(3)
            .collect();
        assert_eq!(holes.len(), 3);
        c.write(holes[0] + 1000, &[9u8; 100]);
        c.write(holes[1] + 4096 - 10, &[9u8; 20]);
        c.zero(holes[2] + 700, 5000, false);
        let (_, bytes) = c.read(holes[0], 4096, 0);
        assert_eq!(&bytes[1000..1100], &[9u8; 100][..]);
        check("after unaligned writes");
        drop(c);
        std::fs::remove_file(&path).unwrap();
        fragmented_file(&path, 4 * MIB, 9);
    }
}

// ---------------------------------------------------------------------------
// 6. 64-bit descriptors over extended headers.

#[test]
fn extended_headers_report_holes_longer_than_4g_in_one_descriptor() {
    let dir = TempDir::new("bs-64");
    let path = dir.path("sparse16g");
    let size = 16 * GIB;
    let f = create(&path, size);
    put_data(&f, GIB, MIB);
    put_data(&f, 9 * GIB, 2 * MIB);
    f.sync_all().unwrap();
    drop(f);
    let truth = file_truth(&path);
    assert_eq!(
        truth,
        vec![(GIB, HOLE), (MIB, DATA), (8 * GIB - MIB, HOLE), (2 * MIB, DATA), (7 * GIB - 2 * MIB, HOLE)]
    );
    let server = Server::start(&[path.to_str().unwrap()]);
    let mut c = Client::connect(&server.addr(), EH);
    for round in ["cold", "cached"] {
        let chunks = c.block_status_raw(0, size, 0, &[]).expect("BLOCK_STATUS over 16 GiB");
        assert_eq!(chunks.len(), 1, "{round}: {chunks:?}");
        let descriptors = &chunks[0].1;
        assert!(descriptors.iter().any(|d| d.0 > 4 * GIB), "{round}: no descriptor over 4 GiB: {descriptors:?}");
        let map: Map = descriptors.iter().map(|&(l, s)| (l, s as u32)).collect();
        assert!(descriptors.iter().all(|d| d.1 >> 32 == 0), "{round}: upper status bits set");
        assert_maps_equal(round, &map, &truth, 0);
    }
    // From an offset inside the first hole, still 64-bit lengths.
    let m = c.block_status(GIB / 2, size - GIB / 2, 0);
    assert_maps_equal("from 512 MiB", &m, &clip(&truth, 0, GIB / 2, size), GIB / 2);
}

// ---------------------------------------------------------------------------
// 7. BLOCK_STATUS_PAYLOAD.

fn status_payload(effect: u64, ids: &[u32]) -> Vec<u8> {
    let mut p = effect.to_be_bytes().to_vec();
    for id in ids {
        p.extend_from_slice(&id.to_be_bytes());
    }
    p
}

#[test]
fn block_status_payload_selects_contexts() {
    let dir = TempDir::new("bs-payload");
    let path = dir.path("file");
    let f = create(&path, 4 * MIB);
    put_data(&f, 512 * KIB, 64 * KIB);
    preallocate(&f, 2 * MIB, 256 * KIB);
    f.sync_all().unwrap();
    drop(f);
    let truth = file_truth(&path);
    let server = Server::start(&[path.to_str().unwrap()]);
    let addr = server.addr();

    let bare = Client::connect(&addr, Opts { meta: false, ..EH });
    assert_eq!(bare.tflags & TF_BLOCK_STATUS_PAYLOAD, 0, "BLOCK_STATUS_PAYLOAD advertised without contexts");
    bare.disconnect();
    let compact = Client::connect(&addr, SR);
    assert_eq!(compact.tflags & TF_BLOCK_STATUS_PAYLOAD, 0, "BLOCK_STATUS_PAYLOAD advertised without extended headers");
    compact.disconnect();

    let mut c = Client::connect(&addr, EH);
    assert_ne!(c.tflags & TF_BLOCK_STATUS_PAYLOAD, 0, "GO flags {:#x} lack BLOCK_STATUS_PAYLOAD", c.tflags);
    let id = c.context.unwrap();
    let check_ok = |c: &mut Client, offset: u64, effect: u64| {
        let payload = status_payload(effect, &[id]);
        let chunks = c
            .block_status_raw(offset, payload.len() as u64, FLAG_PAYLOAD_LEN, &payload)
            .unwrap_or_else(|e| panic!("BLOCK_STATUS with payload at {offset}+{effect}: error {e}"));
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        assert_eq!(chunks[0].0, id);
        let map: Map = chunks[0].1.iter().map(|&(l, s)| (l, s as u32)).collect();
        assert_maps_equal(
            &format!("payload form at {offset}+{effect}"),
            &map,
            &clip(&truth, 0, offset, offset + effect),
            offset,
        );
    };
    check_ok(&mut c, 0, 4 * MIB);
    check_ok(&mut c, 500 * KIB, 2 * MIB);
    for (what, ids) in [
        ("unknown id", vec![id.wrapping_add(1)]),
        ("duplicate id", vec![id, id]),
        ("unknown + known", vec![id, id ^ 0x8000_0000]),
    ] {
        let payload = status_payload(MIB, &ids);
        let got = c.block_status_raw(0, payload.len() as u64, FLAG_PAYLOAD_LEN, &payload);
        assert_eq!(got.map(|_| ()), Err(EINVAL), "{what}: want EINVAL");
        // The connection carries on.
        check_ok(&mut c, 0, MIB);
        let (_, bytes) = c.read(512 * KIB, 4 * KIB, 0);
        assert_ne!(bytes, vec![0u8; 4096], "{what}: read after the error");
    }
    c.disconnect();
}

// ---------------------------------------------------------------------------
// 8. Sparse structured reads.

const PY_READ: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
offset, count, flags = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
buf = bytearray(count)
chunks = []
def cb(sub, off, status, err):
    chunks.append((off, len(sub), status))
    buf[off - offset:off - offset + len(sub)] = sub
    return 0
h.pread_structured(count, offset, cb, flags)
for off, n, status in sorted(chunks):
    kind = {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole"}[status]
    print(off, n, kind)
sys.stdout.flush()
open(sys.argv[5], "wb").write(buf)
"#;

/// pread_structured: the chunks (offset, length, is_hole), checked to tile
/// the request, and the assembled bytes.
fn py_read(uri: &str, offset: u64, count: u64, flags: u32, scratch: &Path) -> (Vec<(u64, u64, bool)>, Vec<u8>) {
    let out =
        python(PY_READ, &[uri, &offset.to_string(), &count.to_string(), &flags.to_string(), scratch.to_str().unwrap()]);
    let chunks: Vec<(u64, u64, bool)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2] == "hole")
        })
        .collect();
    let mut at = offset;
    for c in &chunks {
        assert_eq!(c.0, at, "chunks overlap or leave a gap: {chunks:?}");
        assert!(c.1 > 0);
        at += c.1;
    }
    assert_eq!(at, offset + count, "chunks do not cover the read: {chunks:?}");
    (chunks, std::fs::read(scratch).unwrap())
}

/// Kind of every byte of `[from, to)` per chunk list; panics on a mix.
fn chunk_kind(chunks: &[(u64, u64, bool)], from: u64, to: u64) -> bool {
    let kinds: Vec<bool> = chunks.iter().filter(|c| c.0 < to && c.0 + c.1 > from).map(|c| c.2).collect();
    assert!(!kinds.is_empty() && kinds.iter().all(|&k| k == kinds[0]), "[{from}, {to}) is not one kind: {chunks:?}");
    kinds[0]
}

#[test]
fn structured_reads_send_holes_as_hole_chunks() {
    if !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("bs-sparse-read");
    let path = dir.path("file");
    let f = create(&path, 4 * MIB);
    put_data(&f, 0, 64 * KIB);
    put_data(&f, 64 * KIB + MIB, 128 * KIB);
    preallocate(&f, 2 * MIB, 128 * KIB);
    f.sync_all().unwrap();
    drop(f);
    let contents = std::fs::read(&path).unwrap();
    let server = Server::start(&[path.to_str().unwrap()]);
    let uri = server.tcp_uri.clone().unwrap();
    let scratch = dir.path("read-out");
    let (d1, h, d2) = (64 * KIB, 64 * KIB + MIB, 64 * KIB + MIB + 128 * KIB);
    for round in ["cold", "after block status"] {
        let (chunks, bytes) = py_read(&uri, 0, d2, 0, &scratch);
        assert!(bytes == contents[..d2 as usize], "{round}: assembled bytes differ from the file");
        assert!(!chunk_kind(&chunks, 0, d1), "{round}: first data run");
        assert!(chunk_kind(&chunks, d1, h), "{round}: the hole: {chunks:?}");
        assert!(!chunk_kind(&chunks, h, d2), "{round}: second data run");
        // Another start, and a fallocated range at the end.
        let (chunks, bytes) = py_read(&uri, 4 * KIB, 3 * MIB - 4 * KIB, 0, &scratch);
        assert!(bytes == contents[4 * KIB as usize..3 * MIB as usize], "{round}: read from 4 KiB differs");
        assert!(chunk_kind(&chunks, 2 * MIB, 2 * MIB + 128 * KIB), "{round}: fallocated range not a hole");
        // DF: one data chunk, holes as explicit zeroes.
        let (chunks, bytes) = py_read(&uri, 0, d2, 1 << 2, &scratch);
        assert_eq!(chunks, vec![(0, d2, false)], "{round}: DF read");
        assert!(bytes == contents[..d2 as usize], "{round}: DF bytes differ");
        python_map(&uri, 1 << 31, 0);
    }
    // A client not bound by the block size may start unaligned: the partial
    // first block is data, whole zero blocks after it are holes.
    let mut c = Client::connect(&server.addr(), SR);
    let (pieces, bytes) = c.read(100, h + KIB - 100, 0);
    assert!(bytes == contents[100..(h + KIB) as usize], "unaligned read differs");
    assert!(
        !chunk_kind(&pieces, 100, d1) && chunk_kind(&pieces, d1, h) && !chunk_kind(&pieces, h, h + KIB),
        "{pieces:?}"
    );
    let (pieces, bytes) = c.read(0, d2, FLAG_DF);
    assert_eq!(pieces, vec![(0, d2, false)]);
    assert!(bytes == contents[..d2 as usize]);
}

// ---------------------------------------------------------------------------
// 9. Sparse copies.

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn copies_stay_sparse() {
    if !require("nbdcopy") || !require("qemu-img") {
        return;
    }
    let dir = TempDir::new("bs-copy");
    let path = dir.path("source");
    let size = 2 * GIB;
    let f = create(&path, size);
    for (offset, len) in [(0, MIB), (300 * MIB, 64 * KIB), (GIB + 4 * KIB, 3 * MIB), (size - 8 * KIB, 8 * KIB)] {
        put_data(&f, offset, len);
    }
    preallocate(&f, 500 * MIB, 8 * MIB);
    f.sync_all().unwrap();
    drop(f);
    let source_allocated = allocated(&path);
    let server = Server::start(&[path.to_str().unwrap()]);
    let uri = server.tcp_uri.clone().unwrap();

    let by_nbdcopy = dir.path("nbdcopy.img");
    create(&by_nbdcopy, size);
    run_ok("nbdcopy", &[&uri, by_nbdcopy.to_str().unwrap()]);
    let by_qemu = dir.path("qemu.img");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, by_qemu.to_str().unwrap()]);
    for copy in [&by_nbdcopy, &by_qemu] {
        assert_eq!(std::fs::metadata(copy).unwrap().len(), size);
        let got = allocated(copy);
        assert!(
            got <= 2 * source_allocated + MIB,
            "{}: {got} bytes allocated for a source with {source_allocated}",
            copy.display()
        );
        let out =
            run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", path.to_str().unwrap(), copy.to_str().unwrap()]);
        assert!(out.contains("Images are identical"), "qemu-img compare: {out}");
    }
}

// ---------------------------------------------------------------------------
// 2b. A write completing while the first scan of an export is being cached.

/// Every export starts with an empty cache, and the first BLOCK_STATUS scan
/// of a file with many extents takes a while to insert. A WRITE into a hole
/// that completes while that happens must still be reported as data once its
/// reply is in. One server, many exports of the same file (one empty cache
/// each), the write timed across the end of the scan.
#[test]
fn write_racing_the_first_scan_is_never_reported_as_a_hole() {
    let dir = TempDir::new("bs-race");
    let path = dir.path("striped");
    let size = 64 * MIB;
    let f = create(&path, size);
    for block in (0..size).step_by(8 * KIB as usize) {
        put_data(&f, block, 4 * KIB);
    }
    f.sync_all().unwrap();
    drop(f);
    let exports = 40;
    let specs: Vec<String> = (0..exports).map(|i| format!("e{i}={}", path.display())).collect();
    let args: Vec<&str> = specs.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let addr = server.addr();
    // How long a cold scan of the whole file takes, scan and caching included.
    let started = std::time::Instant::now();
    let cold = Client::connect(&addr, Opts { export: "e0", ..SR }).block_status(0, size, 0);
    let scan = started.elapsed();
    assert_eq!(cold.len(), (size / (4 * KIB)) as usize, "striped file: 4 KiB data, 4 KiB hole");
    let mut stale = vec![];
    for i in 1..exports {
        let name = format!("e{i}");
        let mut mapper = Client::connect(&addr, Opts { export: &name, ..SR });
        let mut writer = Client::connect(&addr, Opts { export: &name, ..SR });
        // Spread the writes from half-way through the scan to past its end.
        let delay = scan.mul_f64(0.5 + 0.7 * i as f64 / exports as f64);
        let mapping = std::thread::spawn(move || mapper.block_status(0, size, 0).len());
        std::thread::sleep(delay);
        let block = (i as u64 * 97 + 1) * 8 * KIB + 4 * KIB;
        assert_eq!(ground_truth(&path, block, block + 4 * KIB), vec![(4 * KIB, HOLE)]);
        writer.write(block, &nonzero_bytes(4096, i as u64));
        assert!(mapping.join().unwrap() > 1000);
        assert_eq!(ground_truth(&path, block, block + 4 * KIB), vec![(4 * KIB, DATA)], "the filesystem has the write");
        let after = writer.block_status(block, 4 * KIB, 0);
        let other = Client::connect(&addr, Opts { export: &name, ..SR }).block_status(block, 4 * KIB, 0);
        if after != vec![(4 * KIB, DATA)] || other != vec![(4 * KIB, DATA)] {
            stale.push(format!("export {name}: write at {block} after {delay:?}: reported {after:?} / {other:?}"));
        }
    }
    assert!(
        stale.is_empty(),
        "written blocks reported as holes after the WRITE reply (scan took {scan:?}):\n{}",
        stale.join("\n")
    );
}
