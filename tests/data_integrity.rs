//! Data integrity under concurrency, crashes and storage faults:
//! - unaligned writes, zeroes and trims that share blocks, issued together
//!   on O_DIRECT files and checked against a model;
//! - two exports of one file see each other's writes in block status;
//! - kill -9 in the middle of pipelined writes loses no acknowledged write;
//! - ENOSPC and EIO reach the client as such, with a reason, and the
//!   connection stays usable; short transfers are carried through.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::raw::{self, Mode, Raw};
use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// python3-libnbd under a wall-clock limit.
fn py(script: &str, args: &[&str]) -> String {
    let mut full = vec!["300", PYTHON, "-c", script];
    full.extend_from_slice(args);
    run_ok("timeout", &full)
}

/// Rounds of concurrent, non-overlapping operations packed into small
/// windows so that they share 512-byte and 4 KiB blocks; every byte is
/// checked against a model (trimmed bytes may read as old data or zero).
const WRITE_MIX: &str = r#"
import os, random, sys
import nbd

uri, path, rounds, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# The export's starting contents are this file's; it is the export itself
# unless the export is in memory.
file_backed = sys.argv[5] == "file"
rng = random.Random(seed)
size = os.path.getsize(path)
with open(path, "rb") as f:
    model = bytearray(f.read())
known = bytearray(b"\x01") * size

handles = []
for _ in range(2):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
assert handles[0].get_size() == size

def check(where):
    data = handles[0].pread(size, 0)
    for i in range(size):
        if known[i] and data[i] != model[i]:
            lo = max(0, i - 8)
            raise SystemExit(f"{where}: byte {i} is {data[i]:#x}, model {model[i]:#x} "
                             f"(read {data[lo:i+8].hex()} model {model[lo:i+8].hex()})")

ops_total = 0
for round_no in range(rounds):
    window = rng.randrange(2048, 12288)
    base = rng.randrange(0, size - window)
    cuts = sorted(rng.sample(range(1, window), rng.randrange(4, 24)))
    segments = [(base + a, b - a) for a, b in zip([0] + cuts, cuts + [window])]
    pending = []
    for index, (offset, length) in enumerate(segments):
        h = handles[index % 2]
        kind = rng.choice(["write", "write", "fua", "zero", "zero-nohole", "trim", "skip"])
        if kind in ("write", "fua"):
            data = os.urandom(length)
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            flags = nbd.CMD_FLAG_FUA if kind == "fua" else 0
            pending.append((h, h.aio_pwrite(buf, offset, flags=flags), buf))
            model[offset:offset + length] = data
            known[offset:offset + length] = b"\x01" * length
        elif kind.startswith("zero"):
            flags = nbd.CMD_FLAG_NO_HOLE if kind == "zero-nohole" else 0
            pending.append((h, h.aio_zero(length, offset, flags=flags), None))
            model[offset:offset + length] = bytes(length)
            known[offset:offset + length] = b"\x01" * length
        elif kind == "trim":
            pending.append((h, h.aio_trim(length, offset), None))
            known[offset:offset + length] = bytes(length)
        ops_total += kind != "skip"
    for h, cookie, _ in pending:
        while not h.aio_command_completed(cookie):
            h.poll(-1)
    if round_no % 100 == 99:
        check(f"after round {round_no}")
check("at the end")
for h in handles:
    h.flush()
    h.shutdown()
if not file_backed:
    print(ops_total)
    raise SystemExit(0)
with open(path, "rb") as f:
    on_disk = f.read()
for i in range(size):
    if known[i] and on_disk[i] != model[i]:
        raise SystemExit(f"file: byte {i} is {on_disk[i]:#x}, model {model[i]:#x}")
print(ops_total)
"#;

fn write_mix(extra: &[&str], size: u64, rounds: u32, seed: u64) -> u64 {
    let dir = TempDir::new("mix");
    let path = dir.path("disk.img");
    std::fs::write(&path, random_bytes(size as usize, seed)).unwrap();
    let path_arg = path.display().to_string();
    let mut args = vec![path_arg.as_str()];
    args.extend_from_slice(extra);
    let mut server = Server::start(&args);
    let out = py(WRITE_MIX, &[server.uri(), &path_arg, &rounds.to_string(), &seed.to_string(), "file"]);
    assert_eq!(server.stop(), Some(0));
    out.trim().parse().expect("operation count")
}

/// The export size is not a multiple of 512, so the server advertises a
/// 1-byte minimum block and libnbd sends unaligned requests as they are.
#[test]
fn unaligned_writes_zeroes_and_trims_sharing_blocks_match_the_model_on_o_direct() {
    if !require("nbd-python") {
        return;
    }
    let ops = write_mix(&[], 4 * MIB + 123, 400, 7);
    assert!(ops > 4000, "{ops} operations");
}

#[test]
fn the_same_mix_holds_on_buffered_and_memory_exports() {
    if !require("nbd-python") {
        return;
    }
    write_mix(&["--no-direct"], 2 * MIB + 77, 150, 11);
    let mut server = Server::start(&["memory:3M"]);
    let dir = TempDir::new("mix-memory");
    let path = dir.path("zeroes.img");
    sparse_file(&path, 3 * MIB);
    py(WRITE_MIX, &[server.uri(), &path.display().to_string(), "150", "13", "memory"]);
    assert_eq!(server.stop(), Some(0));
}

/// Two exports of one file: a write through one is immediately visible in
/// the other's block status (one extent cache per file, not per export).
#[test]
fn two_exports_of_one_file_share_block_status() {
    if !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("shared-image");
    let path = dir.path("f.img");
    sparse_file(&path, 8 * MIB);
    let a = format!("a={}", path.display());
    let b = format!("b={}", path.display());
    let mut server = Server::start(&[&a, &b]);
    let script = r#"
import sys
import nbd
a, b = nbd.NBD(), nbd.NBD()
for h, uri in ((a, sys.argv[1]), (b, sys.argv[2])):
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
def hole_at(h, offset):
    found = []
    def cb(ctx, off, entries, err):
        found.append(entries[1] & 1)
    h.block_status(4096, offset, cb)
    return found[0] == 1
assert hole_at(b, 4 * 1024 * 1024), "a fresh sparse file starts as a hole"
a.pwrite(b"\x5a" * 65536, 4 * 1024 * 1024)
a.flush()
assert not hole_at(b, 4 * 1024 * 1024), "export b still reports a hole where a wrote"
b.pwrite(b"\x33" * 4096, 1024 * 1024)
assert not hole_at(a, 1024 * 1024), "and the other way round"
print("ok")
"#;
    assert_eq!(py(script, &[&server.export_uri("a"), &server.export_uri("b")]).trim(), "ok");
    // And a copy tool mapping b gets a's data.
    if require("nbdcopy") {
        let copy = dir.path("copy.img");
        run_ok("nbdcopy", &[&server.export_uri("b"), &copy.display().to_string()]);
        let data = file_bytes(&copy);
        assert!(data[4 * MIB as usize..4 * MIB as usize + 65536].iter().all(|&x| x == 0x5a), "nbdcopy lost a's write");
    }
    assert_eq!(server.stop(), Some(0));
}

/// Pipelined writes (plain, FUA, with FLUSHes), kill -9 in the middle: after
/// a restart every acknowledged write is there. Each 4 KiB block is written
/// once with a pattern naming it, so acknowledged blocks are checkable.
#[test]
fn kill_9_mid_stream_loses_no_acknowledged_write() {
    let dir = TempDir::new("kill9");
    let path = dir.path("disk.img");
    sparse_file(&path, 64 * MIB);
    let path_arg = path.display().to_string();
    for round in 0..3u64 {
        let mut server = Server::start(&[&path_arg]);
        let addr = server.addr();
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        let writer = {
            let acked = std::sync::Arc::clone(&acked);
            std::thread::spawn(move || {
                let mut c = Raw::open(&addr, "");
                let reader = c.s.try_clone().unwrap();
                reader.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let acks = std::thread::spawn(move || {
                    let mut r = Raw { s: reader, mode: Mode::Simple };
                    loop {
                        let mut magic = [0u8; 16];
                        if std::io::Read::read_exact(&mut r.s, &mut magic).is_err() {
                            return;
                        }
                        let (error, cookie) = (raw::be32(&magic[4..]), raw::be64(&magic[8..]));
                        if error == 0 && cookie < 1 << 32 {
                            acked.lock().unwrap().push(cookie);
                        }
                    }
                });
                for block in 0..16384u64 {
                    let flags = if block % 7 == 0 { raw::CMD_FLAG_FUA } else { 0 };
                    let mut m = raw::request_bytes(flags, raw::CMD_WRITE, block, block * 4096, 4096);
                    m.extend_from_slice(&block_pattern(round, block));
                    if std::io::Write::write_all(&mut c.s, &m).is_err() {
                        break;
                    }
                    if block % 64 == 63 {
                        let flush = raw::request_bytes(0, raw::CMD_FLUSH, 1 << 40 | block, 0, 0);
                        if std::io::Write::write_all(&mut c.s, &flush).is_err() {
                            break;
                        }
                    }
                }
                let _ = acks.join();
            })
        };
        // Let a few thousand writes through, then kill.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while acked.lock().unwrap().len() < 1500 + 1000 * round as usize {
            assert!(std::time::Instant::now() < deadline, "writes are not being acknowledged");
            std::thread::sleep(Duration::from_millis(2));
        }
        server.kill9();
        writer.join().unwrap();
        let acked = acked.lock().unwrap().clone();
        let file = std::fs::File::open(&path).unwrap();
        let mut block = vec![0u8; 4096];
        for &cookie in &acked {
            file.read_exact_at(&mut block, cookie * 4096).unwrap();
            assert!(block == block_pattern(round, cookie), "round {round}: acknowledged block {cookie} is missing");
        }
        // And the restarted server serves them.
        let mut server = Server::start(&[&path_arg]);
        let mut c = Raw::open(&server.addr(), "");
        for &cookie in acked.iter().step_by(97) {
            assert!(c.read(1, cookie * 4096, 4096).unwrap() == block_pattern(round, cookie));
        }
        c.disconnect();
        assert_eq!(server.stop(), Some(0));
    }
}

fn block_pattern(round: u64, block: u64) -> Vec<u8> {
    Rng(round << 32 | block).bytes(4096)
}

/// A file system that fills up: writes past its space get ENOSPC with a
/// message about space, not "beyond the end of the export"; the same
/// connection then reads and overwrites allocated data fine. On tmpfs
/// (inline copies) and a loop-mounted ext4 (O_DIRECT through the ring).
#[test]
fn a_full_file_system_is_enospc_with_a_reason_and_the_connection_stays_usable() {
    if !is_root() {
        eprintln!("SKIP: mounting a small file system needs root");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI runs as root");
        return;
    }
    for fs in ["tmpfs", "ext4"] {
        let dir = TempDir::new("enospc");
        let mount = dir.path("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        let mount_arg = mount.display().to_string();
        if fs == "tmpfs" {
            run_ok("mount", &["-t", "tmpfs", "-o", "size=4m", "tmpfs", &mount_arg]);
        } else {
            let image = dir.path("fs.img");
            sparse_file(&image, 12 * MIB);
            run_ok("mkfs.ext4", &["-q", "-F", &image.display().to_string()]);
            run_ok("mount", &["-o", "loop", &image.display().to_string(), &mount_arg]);
        }
        let _unmount = Unmount(mount.clone());
        fill_until_enospc(&mount.join("big.img"), fs);
    }
}

fn fill_until_enospc(path: &std::path::Path, fs: &str) {
    let path_arg = path.display().to_string();
    for mode in [Mode::Simple, Mode::Structured] {
        sparse_file(path, 64 * MIB);
        let mut server = Server::start(&[&path_arg]);
        let mut c = Raw::open_mode(&server.addr(), "", mode);
        let data = vec![0xa5u8; MIB as usize];
        assert_eq!(c.write(1, 0, &data).0, 0, "{fs}: the first megabyte fits");
        let mut failure = None;
        for i in 1..64u64 {
            let (error, message) = c.write(1 + i, i * MIB, &data);
            if error != 0 {
                failure = Some((error, message));
                break;
            }
        }
        let (error, message) = failure.unwrap_or_else(|| panic!("{fs}: the file system never filled up"));
        assert_eq!(error, raw::ENOSPC, "{fs} {mode:?}: {message}");
        if mode == Mode::Structured {
            assert!(message.contains("space"), "{fs}: the reason names the cause: {message:?}");
            assert!(!message.contains("end of the export"), "{fs}: {message:?}");
        }
        assert_eq!(c.read(50, 0, 4096).unwrap(), data[..4096].to_vec(), "{fs}: connection still usable");
        assert_eq!(c.write(51, 0, &vec![7u8; 4096]).0, 0, "{fs}: allocated space can still be rewritten");
        c.disconnect();
        assert_eq!(server.stop(), Some(0));
        std::fs::remove_file(path).unwrap();
    }
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// Injected EIO on reads and writes of one range: the client gets EIO with
/// a reason, other ranges and later requests are unaffected.
#[test]
fn injected_eio_reaches_the_client_and_the_connection_stays_usable() {
    let dir = TempDir::new("eio");
    let path = dir.path("disk.img");
    std::fs::write(&path, random_bytes(8 * MIB as usize, 3)).unwrap();
    let path_arg = path.display().to_string();
    let faults = "eio-read=1048576-1052672,eio-write=2097152-2101248";
    for target in [path_arg.as_str(), "memory:8M", "--no-direct"] {
        let mut args = vec![target];
        if target == "--no-direct" {
            args.push(&path_arg);
        }
        let launch = Launch { env: vec![("RINGNBD_TEST_FAULTS", faults)], ..Launch::new(&args) };
        let mut server = Server::launch(&launch);
        let mut c = Raw::open_mode(&server.addr(), "", Mode::Structured);
        let (error, message) = c.read(1, MIB, 4096).unwrap_err();
        assert_eq!(error, raw::EIO, "{target}");
        assert!(message.contains("I/O error"), "{target}: {message:?}");
        assert!(c.read(2, 0, 4096).is_ok(), "{target}: other ranges read fine");
        let (error, _) = c.write(3, 2 * MIB + 100, &[1u8; 100]);
        assert_eq!(error, raw::EIO, "{target}: write");
        assert_eq!(c.write(4, 3 * MIB, &[2u8; 100]).0, 0, "{target}: other writes succeed");
        assert_eq!(c.read(5, 3 * MIB, 100).unwrap(), vec![2u8; 100]);
        c.disconnect();
        assert_eq!(server.stop(), Some(0));
    }
}

/// Short reads and writes from the storage are continued, not reported.
#[test]
fn short_transfers_are_completed() {
    let dir = TempDir::new("short");
    let path = dir.path("disk.img");
    let original = random_bytes(4 * MIB as usize, 5);
    std::fs::write(&path, &original).unwrap();
    let path_arg = path.display().to_string();
    for direct in [true, false] {
        let mut args = vec![path_arg.as_str()];
        if !direct {
            args.push("--no-direct");
        }
        let launch = Launch {
            env: vec![("RINGNBD_TEST_FAULTS", "short-read=0-4194304,short-write=0-4194304")],
            ..Launch::new(&args)
        };
        let mut server = Server::launch(&launch);
        let mut c = Raw::open(&server.addr(), "");
        let at = MIB + 512;
        assert_eq!(c.read(1, at, 65536).unwrap(), original[at as usize..at as usize + 65536].to_vec());
        let data = random_bytes(200_000, 9);
        assert_eq!(c.write(2, 777, &data).0, 0);
        assert_eq!(c.read(3, 777, data.len() as u32).unwrap(), data);
        c.disconnect();
        assert_eq!(server.stop(), Some(0));
        let mut back = vec![0u8; data.len()];
        std::fs::File::open(&path).unwrap().read_exact_at(&mut back, 777).unwrap();
        assert_eq!(back, data, "on disk");
        std::fs::write(&path, &original).unwrap();
    }
}
