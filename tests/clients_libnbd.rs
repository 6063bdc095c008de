//! libnbd's tools (nbdinfo, nbdcopy) and python3-libnbd against the real
//! server, over TCP and over the Unix socket: export listing and
//! descriptions, flags, block-size limits, block-status maps, and
//! multi-connection copies in and out of memory and O_DIRECT file exports.
mod common;

use common::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 64 * KIB;

fn assert_same(what: &str, actual: &[u8], expected: &[u8]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(i) = (0..actual.len()).find(|&i| actual[i] != expected[i]) {
        panic!("{what}: first difference at offset {i}: got {:#04x}, expected {:#04x}", actual[i], expected[i]);
    }
}

/// The raw value of `"key": value` in nbdinfo's JSON (first occurrence).
fn json_value<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\": ");
    let at = json.find(&pat).unwrap_or_else(|| panic!("no {key:?} in:\n{json}")) + pat.len();
    let rest = &json[at..];
    rest[..rest.find([',', '\n', '}']).unwrap_or(rest.len())].trim()
}

// ---------------------------------------------------------------------------
// nbdinfo --list, --json

fn list_exports(transport: Transport) {
    if !require("nbdinfo") {
        return;
    }
    let dir = TempDir::new("libnbd-list");
    let file = dir.path("beta.raw");
    sparse_file(&file, 8 * MIB);
    let description = "ringnbd integration description";
    let server =
        Server::start(&["--description", description, "alpha=memory:16M", &format!("beta={}", file.display())]);
    let target = uri(&server, transport, "");

    let list = run_ok("nbdinfo", &["--list", &target]);
    assert!(list.contains("export=\"alpha\":"), "alpha missing from --list:\n{list}");
    assert!(list.contains("export=\"beta\":"), "beta missing from --list:\n{list}");
    assert!(list.contains(&format!("description: {description}")), "description missing from --list:\n{list}");
    assert!(list.contains("export-size: 16777216"), "{list}");
    assert!(list.contains("export-size: 8388608"), "{list}");

    let json = run_ok("nbdinfo", &["--list", "--json", &target]);
    assert!(json.contains("\"export-name\": \"alpha\""), "{json}");
    assert!(json.contains("\"export-name\": \"beta\""), "{json}");
    assert!(json.contains(&format!("\"description\": \"{description}\"")), "{json}");

    // Each name opens the export it names.
    assert_eq!(run_ok("nbdinfo", &["--size", &uri(&server, transport, "alpha")]).trim(), "16777216");
    assert_eq!(run_ok("nbdinfo", &["--size", &uri(&server, transport, "beta")]).trim(), "8388608");
    // An unknown name is refused.
    let out = run("nbdinfo", &["--size", &uri(&server, transport, "gamma")]);
    assert!(!out.status.success(), "export gamma should not exist");
}

#[test]
fn nbdinfo_list_names_and_description_tcp() {
    list_exports(Transport::Tcp);
}

#[test]
fn nbdinfo_list_names_and_description_unix() {
    list_exports(Transport::Unix);
}

fn info_json(transport: Transport) {
    if !require("nbdinfo") {
        return;
    }
    let ro = Server::start(&["-r", "memory:48M"]);
    let json = run_ok("nbdinfo", &["--json", &uri(&ro, transport, "")]);
    assert_eq!(json_value(&json, "export-size"), "50331648", "{json}");
    assert_eq!(json_value(&json, "is_read_only"), "true", "{json}");
    assert_eq!(json_value(&json, "can_multi_conn"), "true", "{json}");
    assert_eq!(json_value(&json, "block_size_maximum"), "33554432", "{json}");
    assert!(json.contains("\"base:allocation\""), "{json}");

    let rw = Server::start(&["--max-payload", "4M", "memory:1G"]);
    let json = run_ok("nbdinfo", &["--json", &uri(&rw, transport, "")]);
    assert_eq!(json_value(&json, "export-size"), "1073741824", "{json}");
    assert_eq!(json_value(&json, "is_read_only"), "false", "{json}");
    assert_eq!(json_value(&json, "can_multi_conn"), "true", "{json}");
    assert_eq!(json_value(&json, "block_size_maximum"), "4194304", "{json}");
}

#[test]
fn nbdinfo_json_size_read_only_multi_conn_block_size_tcp() {
    info_json(Transport::Tcp);
}

#[test]
fn nbdinfo_json_size_read_only_multi_conn_block_size_unix() {
    info_json(Transport::Unix);
}

// ---------------------------------------------------------------------------
// nbdinfo --can / --is: exit 0 means yes, 2 means no, anything else is an error.

fn can(flag: &str, target: &str) -> bool {
    let out = run("nbdinfo", &["--can", flag, target]);
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        other => panic!("nbdinfo --can {flag} {target}: exit {other:?}: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn is(flag: &str, target: &str) -> bool {
    let out = run("nbdinfo", &["--is", flag, target]);
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        other => panic!("nbdinfo --is {flag} {target}: exit {other:?}: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn can_flags(transport: Transport) {
    if !require("nbdinfo") {
        return;
    }
    let dir = TempDir::new("libnbd-can");
    let file = dir.path("disk.raw");
    sparse_file(&file, 8 * MIB);
    let rw = Server::start(&["mem=memory:16M", &format!("disk={}", file.display())]);
    for name in ["mem", "disk"] {
        let target = uri(&rw, transport, name);
        for flag in ["connect", "read", "write", "flush", "fua", "trim", "zero", "multi-conn", "cache", "df"] {
            assert!(can(flag, &target), "{name}: --can {flag} should be yes");
        }
        assert!(!is("read-only", &target), "{name}: --is read-only should be no");
    }
    assert!(can("fast-zero", &uri(&rw, transport, "mem")), "memory export: --can fast-zero should be yes");

    let ro = Server::start(&["-r", "mem=memory:16M", &format!("disk={}", file.display())]);
    for name in ["mem", "disk"] {
        let target = uri(&ro, transport, name);
        assert!(is("read-only", &target), "{name} with -r: --is read-only should be yes");
        for flag in ["write", "trim", "zero", "fast-zero"] {
            assert!(!can(flag, &target), "{name} with -r: --can {flag} should be no");
        }
        for flag in ["connect", "read", "flush", "multi-conn", "cache", "df"] {
            assert!(can(flag, &target), "{name} with -r: --can {flag} should still be yes");
        }
    }
}

#[test]
fn nbdinfo_can_flags_read_write_and_read_only_tcp() {
    can_flags(Transport::Tcp);
}

#[test]
fn nbdinfo_can_flags_read_write_and_read_only_unix() {
    can_flags(Transport::Unix);
}

// ---------------------------------------------------------------------------
// nbdinfo --map on a sparse memory export, written through python3-libnbd

const PY_WRITE: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
specs = [tuple(int(x) for x in s.split(":")) for s in sys.argv[2:]]
for off, length, byte in specs:
    h.pwrite(bytes([byte]) * length, off)
h.flush()
for off, length, byte in specs:
    got = h.pread(length, off)
    assert got == bytes([byte]) * length, "read back differs at %d" % off
h.shutdown()
print("ok")
"#;

struct MapLine {
    offset: u64,
    length: u64,
    kind: u32,
}

fn parse_nbdinfo_map(text: &str) -> Vec<MapLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 3, "bad map line {l:?}");
            MapLine {
                offset: f[0].parse().unwrap_or_else(|_| panic!("bad offset in {l:?}")),
                length: f[1].parse().unwrap_or_else(|_| panic!("bad length in {l:?}")),
                kind: f[2].parse().unwrap_or_else(|_| panic!("bad type in {l:?}")),
            }
        })
        .collect()
}

fn map_memory(transport: Transport) {
    if !require("nbdinfo") || !require("nbd-python") {
        return;
    }
    let size = 64 * MIB;
    let server = Server::start(&["scratch=memory:64M"]);
    let target = uri(&server, transport, "scratch");

    // Fresh: one hole,zero extent over everything.
    let map = run_ok("nbdinfo", &["--map", &target]);
    let lines = parse_nbdinfo_map(&map);
    assert!(lines.iter().all(|l| l.kind == 3), "fresh memory export should be all hole,zero:\n{map}");
    assert_eq!(lines.iter().map(|l| l.length).sum::<u64>(), size, "{map}");

    let writes: [(u64, u64, u8); 4] =
        [(0, 64 * KIB, 0x11), (2 * MIB, 192 * KIB, 0x22), (10 * MIB + 5000, 100, 0x33), (33 * MIB - 1, 2, 0x44)];
    let args: Vec<String> = writes.iter().map(|&(o, l, b)| format!("{o}:{l}:{b}")).collect();
    let mut py_args = vec![target.as_str()];
    py_args.extend(args.iter().map(String::as_str));
    assert_eq!(python(PY_WRITE, &py_args).trim(), "ok");

    let map = run_ok("nbdinfo", &["--map", &target]);
    let lines = parse_nbdinfo_map(&map);
    let mut next = 0;
    for l in &lines {
        assert_eq!(l.offset, next, "map has a gap or overlap:\n{map}");
        next += l.length;
    }
    assert_eq!(next, size, "map does not cover the export:\n{map}");

    let page_written = |page: u64| writes.iter().any(|&(o, l, _)| o < page + PAGE && page < o + l);
    let kind_at = |off: u64| lines.iter().find(|l| off >= l.offset && off < l.offset + l.length).unwrap().kind;
    let mut page = 0;
    while page < size {
        let expected = if page_written(page) { 0 } else { 3 };
        assert_eq!(kind_at(page), expected, "64 KiB page at {page} (written: {}):\n{map}", page_written(page));
        page += PAGE;
    }
    for &(off, len, _) in &writes {
        assert_eq!(kind_at(off), 0, "{map}");
        assert_eq!(kind_at(off + len - 1), 0, "{map}");
    }
}

#[test]
fn nbdinfo_map_memory_export_tcp() {
    map_memory(Transport::Tcp);
}

#[test]
fn nbdinfo_map_memory_export_unix() {
    map_memory(Transport::Unix);
}

// ---------------------------------------------------------------------------
// nbdcopy with several connections and many requests in flight

const COPY_SIZE: u64 = 64 * MIB;

fn nbdcopy_round_trip(transport: Transport) {
    if !require("nbdcopy") {
        return;
    }
    let dir = TempDir::new("libnbd-copy");
    let src = dir.path("src.raw");
    let expected = make_source(&src, COPY_SIZE, 7);
    let server = Server::start(&["memory:64M"]);
    let target = uri(&server, transport, "");

    run_ok("nbdcopy", &["--connections=4", src.to_str().unwrap(), &target]);
    let out = dir.path("out.raw");
    run_ok("nbdcopy", &["--connections=4", &target, out.to_str().unwrap()]);
    assert_same("file -> memory export -> file", &file_bytes(&out), &expected);
    let out = run("cmp", &[src.to_str().unwrap(), dir.path("out.raw").to_str().unwrap()]);
    assert!(out.status.success(), "cmp: {}", String::from_utf8_lossy(&out.stdout));

    // Many requests in flight, small requests, no extent shortcuts: every byte is read.
    let out2 = dir.path("out2.raw");
    run_ok(
        "nbdcopy",
        &["--connections=4", "--requests=64", "--request-size=65536", "--no-extents", &target, out2.to_str().unwrap()],
    );
    assert_same("memory export -> file (64 requests in flight)", &file_bytes(&out2), &expected);
}

#[test]
fn nbdcopy_file_to_memory_and_back_tcp() {
    nbdcopy_round_trip(Transport::Tcp);
}

#[test]
fn nbdcopy_file_to_memory_and_back_unix() {
    nbdcopy_round_trip(Transport::Unix);
}

fn nbdcopy_between_servers(transport: Transport) {
    if !require("nbdcopy") {
        return;
    }
    let dir = TempDir::new("libnbd-nbd2nbd");
    let src = dir.path("src.raw");
    let expected = make_source(&src, COPY_SIZE, 11);
    // Destination: an O_DIRECT file export full of other data, so the
    // source's zeros must really be written.
    let backing = dir.path("dest.raw");
    std::fs::write(&backing, random_bytes(COPY_SIZE as usize, 12)).unwrap();

    let a = Server::start(&["memory:64M"]);
    let mut b = Server::start(&[&format!("dest={}", backing.display())]);
    let from = uri(&a, transport, "");
    let to = uri(&b, transport, "dest");
    run_ok("nbdcopy", &["--connections=4", "--requests=64", src.to_str().unwrap(), &from]);
    run_ok("nbdcopy", &["--connections=4", "--requests=64", "--flush", &from, &to]);

    // Read the destination back through NBD, then from the disk.
    let out = dir.path("out.raw");
    run_ok("nbdcopy", &["--connections=4", &to, out.to_str().unwrap()]);
    assert_same("nbd -> nbd, read back through NBD", &file_bytes(&out), &expected);
    assert_eq!(b.stop(), Some(0));
    assert_same("nbd -> nbd, destination file on disk", &file_bytes(&backing), &expected);
}

#[test]
fn nbdcopy_nbd_to_nbd_between_two_servers_tcp() {
    nbdcopy_between_servers(Transport::Tcp);
}

#[test]
fn nbdcopy_nbd_to_nbd_between_two_servers_unix() {
    nbdcopy_between_servers(Transport::Unix);
}
