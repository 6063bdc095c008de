//! qemu-img and qemu-io (qemu 10, NBD extended headers) against the real
//! server, over TCP and over the Unix socket: convert/compare round trips,
//! info, block-status maps, pattern writes and reads (zero, discard, flush,
//! FUA, unaligned), many requests in flight, and what reaches the disk.
mod common;

use common::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::process::Command;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 64 * KIB;

/// Panics with the first differing offset unless `actual == expected`
/// outside the `skip` ranges.
fn assert_same(what: &str, actual: &[u8], expected: &[u8], skip: &[(u64, u64)]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    let skipped = |i: usize| skip.iter().any(|&(off, len)| (i as u64) >= off && (i as u64) < off + len);
    if let Some(i) = (0..actual.len()).find(|&i| actual[i] != expected[i] && !skipped(i)) {
        panic!("{what}: first difference at offset {i}: got {:#04x}, expected {:#04x}", actual[i], expected[i]);
    }
}

/// Runs a program, returning (exit code, stdout + stderr).
fn run_code(program: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = run(program, args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// Runs qemu-io on `target` with each of `cmds` as a `-c` command; asserts
/// that it exits 0 and that no command reported a failure (qemu-io does not
/// fail its exit status for a pattern mismatch of an `aio_read`).
fn qemu_io(target: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for cmd in cmds {
        args.push("-c".to_string());
        args.push(cmd.clone());
    }
    args.push(target.to_string());
    let out = Command::new("qemu-io").args(&args).output().expect("run qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let first_cmds: Vec<&String> = cmds.iter().take(8).collect();
    assert!(out.status.success(), "qemu-io on {target} failed ({}); commands {first_cmds:?}...:\n{text}", out.status);
    assert!(
        !text.to_lowercase().contains("failed") && !text.contains("error"),
        "qemu-io on {target} reported a failure; commands {first_cmds:?}...:\n{text}"
    );
    text
}

/// qemu-io commands together with the image they should produce.
struct Script {
    cmds: Vec<String>,
    image: Vec<u8>,
    /// Discarded ranges: their contents are unspecified afterwards.
    undefined: Vec<(u64, u64)>,
}

impl Script {
    fn new(size: u64) -> Script {
        Script { cmds: Vec::new(), image: vec![0; size as usize], undefined: Vec::new() }
    }

    fn fill(&mut self, byte: u8, off: u64, len: u64) {
        self.image[off as usize..(off + len) as usize].fill(byte);
        self.undefined.retain(|&(o, l)| off + len <= o || o + l <= off);
    }

    /// `write [flags] -P byte off len`.
    fn write(&mut self, flags: &str, byte: u8, off: u64, len: u64) {
        self.cmds.push(format!("write {flags} -P {byte:#04x} {off} {len}"));
        self.fill(byte, off, len);
    }

    /// `write -z [flags] off len`.
    fn zero(&mut self, flags: &str, off: u64, len: u64) {
        self.cmds.push(format!("write -z {flags} {off} {len}"));
        self.fill(0, off, len);
    }

    fn discard(&mut self, off: u64, len: u64) {
        self.cmds.push(format!("discard {off} {len}"));
        self.undefined.push((off, len));
    }

    /// `read -P` commands covering `[start, end)` in runs of equal bytes,
    /// skipping discarded ranges.
    fn reads(&self, start: u64, end: u64, aio: bool) -> Vec<String> {
        let verb = if aio { "aio_read" } else { "read" };
        let undefined = |i: u64| self.undefined.iter().any(|&(o, l)| i >= o && i < o + l);
        let mut cmds = Vec::new();
        let mut i = start;
        while i < end {
            if undefined(i) {
                i += 1;
                continue;
            }
            let byte = self.image[i as usize];
            let mut j = i + 1;
            while j < end && !undefined(j) && self.image[j as usize] == byte {
                j += 1;
            }
            cmds.push(format!("{verb} -P {byte:#04x} {i} {}", j - i));
            i = j;
        }
        cmds
    }

    /// A `read -P` of a sub-range the model says is uniform.
    fn read_sub(&self, off: u64, len: u64) -> String {
        let range = &self.image[off as usize..(off + len) as usize];
        assert!(range.iter().all(|&b| b == range[0]), "test bug: {off}+{len} is not uniform");
        format!("read -P {:#04x} {off} {len}", range[0])
    }
}

// ---------------------------------------------------------------------------
// qemu-img convert / compare / info

fn convert_and_compare(transport: Transport) {
    if !require("qemu-img") {
        return;
    }
    let dir = TempDir::new("qemu-convert");
    let size = 32 * MIB;
    let src = dir.path("src.raw");
    let expected = make_source(&src, size, 1);
    // The export starts full of non-zero bytes, so holes in the source must
    // really be written as zeros.
    let backing = dir.path("export.raw");
    std::fs::write(&backing, vec![0xee; size as usize]).unwrap();
    let mut server = Server::start(&[&format!("disk={}", backing.display())]);
    let target = uri(&server, transport, "disk");

    let info = qemu_img_ok(&["info", "--output=json", "-f", "raw", &target]);
    assert!(info.contains(&format!("\"virtual-size\": {size}")), "qemu-img info: {info}");

    qemu_img_ok(&["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &target]);
    qemu_img_ok(&["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &target]);
    qemu_img_ok(&["compare", "-f", "raw", "-F", "raw", &target, src.to_str().unwrap()]);

    let out = dir.path("out.raw");
    qemu_img_ok(&["convert", "-f", "raw", "-O", "raw", &target, out.to_str().unwrap()]);
    assert_same("nbd -> local file", &file_bytes(&out), &expected, &[]);
    qemu_img_ok(&["compare", "-f", "raw", "-F", "raw", out.to_str().unwrap(), &target]);
    qemu_img_ok(&["compare", "-f", "raw", "-F", "raw", &target, out.to_str().unwrap()]);

    // Control: compare does notice one changed byte (exit status 1).
    let f = OpenOptions::new().write(true).open(&out).unwrap();
    f.write_all_at(&[expected[(size / 3) as usize] ^ 0xff], size / 3).unwrap();
    drop(f);
    let (code, text) = run_code("qemu-img", &["compare", "-f", "raw", "-F", "raw", out.to_str().unwrap(), &target]);
    assert_eq!(code, Some(1), "qemu-img compare should report a difference:\n{text}");

    // What the server wrote is really in the file.
    assert_eq!(server.stop(), Some(0));
    assert_same("export file on disk after convert", &file_bytes(&backing), &expected, &[]);
}

fn qemu_img_ok(args: &[&str]) -> String {
    run_ok("qemu-img", args)
}

#[test]
fn qemu_img_convert_compare_info_tcp() {
    convert_and_compare(Transport::Tcp);
}

#[test]
fn qemu_img_convert_compare_info_unix() {
    convert_and_compare(Transport::Unix);
}

// ---------------------------------------------------------------------------
// qemu-img map on a sparse memory export

struct Extent {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
}

fn json_u64(line: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\": ");
    let at = line.find(&pat).unwrap_or_else(|| panic!("no {key} in {line}")) + pat.len();
    let digits: String = line[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("bad {key} in {line}"))
}

fn json_bool(line: &str, key: &str) -> bool {
    let pat = format!("\"{key}\": ");
    let at = line.find(&pat).unwrap_or_else(|| panic!("no {key} in {line}")) + pat.len();
    line[at..].starts_with("true")
}

fn parse_qemu_map(json: &str) -> Vec<Extent> {
    json.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| Extent {
            start: json_u64(l, "start"),
            length: json_u64(l, "length"),
            data: json_bool(l, "data"),
            zero: json_bool(l, "zero"),
        })
        .collect()
}

fn map_memory_export(transport: Transport) {
    if !require("qemu-img") || !require("qemu-io") {
        return;
    }
    let size = 96 * MIB;
    let server = Server::start(&["scratch=memory:96M"]);
    let target = uri(&server, transport, "scratch");

    let info = qemu_img_ok(&["info", "--output=json", "-f", "raw", &target]);
    assert!(info.contains(&format!("\"virtual-size\": {size}")), "qemu-img info: {info}");

    // (offset, length, pattern): page-aligned, multi-page, inside one page,
    // straddling a page boundary.
    let writes: [(u64, u64, u8); 4] =
        [(0, 64 * KIB, 0x11), (MIB, 128 * KIB, 0x22), (8 * MIB + PAGE + 100, 4000, 0x33), (40 * MIB - 10, 20, 0x44)];
    let cmds: Vec<String> = writes.iter().map(|&(off, len, p)| format!("write -P {p:#04x} {off} {len}")).collect();
    qemu_io(&target, &cmds);

    let json = qemu_img_ok(&["map", "--output=json", "-f", "raw", &target]);
    let extents = parse_qemu_map(&json);
    assert!(!extents.is_empty(), "no extents in {json}");
    // Contiguous cover of the whole export.
    let mut next = 0;
    for e in &extents {
        assert_eq!(e.start, next, "map has a gap or overlap:\n{json}");
        next += e.length;
    }
    assert_eq!(next, size, "map does not cover the export:\n{json}");

    let written = |off: u64| writes.iter().any(|&(o, l, _)| off >= o && off < o + l);
    let page_written = |page: u64| writes.iter().any(|&(o, l, _)| o < page + PAGE && page < o + l);
    for e in &extents {
        if e.data {
            // Data only where something was written (at 64 KiB page granularity).
            let mut page = e.start / PAGE * PAGE;
            while page < e.start + e.length {
                assert!(page_written(page), "page {page} reported as data but never written:\n{json}");
                page += PAGE;
            }
        } else {
            assert!(e.zero, "unwritten extent {}+{} not reported as zero:\n{json}", e.start, e.length);
        }
    }
    // Every written byte is inside a data extent.
    for &(off, len, _) in &writes {
        for probe in [off, off + len / 2, off + len - 1] {
            let e = extents.iter().find(|e| probe >= e.start && probe < e.start + e.length).unwrap();
            assert!(e.data && !e.zero, "written offset {probe} reported as data={} zero={}:\n{json}", e.data, e.zero);
        }
    }
    // And the big untouched stretches are zero, not data.
    for probe in [4 * MIB, 20 * MIB, 64 * MIB, size - 1] {
        assert!(!written(probe));
        let e = extents.iter().find(|e| probe >= e.start && probe < e.start + e.length).unwrap();
        assert!(!e.data && e.zero, "unwritten offset {probe} reported as data:\n{json}");
    }

    // The data reads back.
    let mut reads: Vec<String> = writes.iter().map(|&(off, len, p)| format!("read -P {p:#04x} {off} {len}")).collect();
    reads.push(format!("read -P 0 {} {}", 8 * MIB + PAGE, 100));
    reads.push(format!("read -P 0 {} {}", 64 * KIB, MIB - 64 * KIB));
    qemu_io(&target, &reads);
}

#[test]
fn qemu_img_map_memory_export_tcp() {
    map_memory_export(Transport::Tcp);
}

#[test]
fn qemu_img_map_memory_export_unix() {
    map_memory_export(Transport::Unix);
}

// ---------------------------------------------------------------------------
// qemu-io: patterns, zero, discard, flush, FUA, unaligned

const IO_SIZE: u64 = 4 * MIB;

fn pattern_script() -> Script {
    let mut s = Script::new(IO_SIZE);
    s.write("", 0xa1, 0, 64 * KIB);
    s.write("", 0xb2, 64 * KIB, 64 * KIB);
    s.zero("", 64 * KIB, 64 * KIB);
    s.write("-f", 0xc3, 128 * KIB, 64 * KIB);
    s.write("", 0xd4, 256 * KIB, 192 * KIB);
    s.discard(320 * KIB, 64 * KIB);
    s.write("", 0xe5, 512 * KIB, 128 * KIB);
    s.zero("-u", 512 * KIB, 64 * KIB);
    s.zero("-f", 576 * KIB + 512, 4096);
    s.cmds.push("flush".to_string());
    // Unaligned writes.
    s.write("", 0x5a, 1000, 3000);
    s.write("", 0x6b, 64 * KIB - 1, 2);
    s.write("-f", 0x7c, MIB - 3, 70_000);
    s.write("", 0x8d, 2 * MIB + 4095, 1);
    s.zero("", 2 * MIB + 4094, 1);
    s.write("", 0x9e, IO_SIZE - 777, 777);
    s.cmds.push("flush".to_string());
    s
}

fn qemu_io_patterns(transport: Transport) {
    if !require("qemu-io") {
        return;
    }
    let dir = TempDir::new("qemu-io");
    let backing = dir.path("disk.raw");
    sparse_file(&backing, IO_SIZE);
    let mut server = Server::start(&[&format!("disk={}", backing.display()), &format!("mem=memory:{IO_SIZE}")]);
    let script = pattern_script();
    for name in ["disk", "mem"] {
        let target = uri(&server, transport, name);
        qemu_io(&target, &script.cmds);
        // Read back on a fresh connection: every run of equal bytes, plus
        // unaligned sub-ranges.
        let mut reads = script.reads(0, IO_SIZE, false);
        reads.extend([
            script.read_sub(1001, 2998),
            script.read_sub(999, 1),
            script.read_sub(4000, 1),
            script.read_sub(64 * KIB - 1, 2),
            script.read_sub(64 * KIB + 1, 64 * KIB - 1),
            script.read_sub(MIB - 1, 65_000),
            script.read_sub(128 * KIB + 513, 4000),
            script.read_sub(576 * KIB + 511, 1),
            script.read_sub(576 * KIB + 512, 4096),
        ]);
        qemu_io(&target, &reads);
    }
    // The file export's contents are on disk.
    assert_eq!(server.stop(), Some(0));
    assert_same("qemu-io writes on disk", &file_bytes(&backing), &script.image, &script.undefined);
}

#[test]
fn qemu_io_patterns_zero_discard_flush_unaligned_tcp() {
    qemu_io_patterns(Transport::Tcp);
}

#[test]
fn qemu_io_patterns_zero_discard_flush_unaligned_unix() {
    qemu_io_patterns(Transport::Unix);
}

// ---------------------------------------------------------------------------
// qemu-io: many requests in flight

const AIO_SIZE: u64 = 8 * MIB;
const AIO_COUNT: u64 = 64;

fn qemu_io_many_aio(transport: Transport) {
    if !require("qemu-io") {
        return;
    }
    let dir = TempDir::new("qemu-aio");
    let backing = dir.path("disk.raw");
    sparse_file(&backing, AIO_SIZE);
    let mut server = Server::start(&[&format!("disk={}", backing.display()), &format!("mem=memory:{AIO_SIZE}")]);
    // 64 distinct patterns at distinct, mostly unaligned offsets and lengths.
    let mut s = Script::new(AIO_SIZE);
    let mut ranges = Vec::new();
    for i in 0..AIO_COUNT {
        let off = i * 120_000 + (i % 7) * 13;
        let len = 96 * KIB - (i % 5) * 1000;
        let byte = (i + 1) as u8;
        s.cmds.push(format!("aio_write -P {byte:#04x} {off} {len}"));
        s.fill(byte, off, len);
        ranges.push((off, len, byte));
    }
    s.cmds.push("aio_flush".to_string());
    assert!(ranges.last().map(|&(o, l, _)| o + l).unwrap() < AIO_SIZE);

    for name in ["disk", "mem"] {
        let target = uri(&server, transport, name);
        // Writes in flight together, then all reads in flight together, on one connection.
        let mut cmds = s.cmds.clone();
        cmds.extend(ranges.iter().map(|&(off, len, b)| format!("aio_read -P {b:#04x} {off} {len}")));
        cmds.push("aio_flush".to_string());
        let text = qemu_io(&target, &cmds);
        assert_eq!(text.matches("wrote ").count() as u64, AIO_COUNT, "not every aio_write completed:\n{text}");
        assert_eq!(text.matches("read ").count() as u64, AIO_COUNT, "not every aio_read completed:\n{text}");
        // A fresh connection sees every pattern and the gaps still zero.
        qemu_io(&target, &s.reads(0, AIO_SIZE, false));
    }
    assert_eq!(server.stop(), Some(0));
    assert_same("aio writes on disk", &file_bytes(&backing), &s.image, &[]);
}

#[test]
fn qemu_io_many_aio_in_flight_tcp() {
    qemu_io_many_aio(Transport::Tcp);
}

#[test]
fn qemu_io_many_aio_in_flight_unix() {
    qemu_io_many_aio(Transport::Unix);
}
