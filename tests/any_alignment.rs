//! Any alignment, for every client: the server advertises a minimum block
//! size of 1 (and its O_DIRECT alignment as the preferred size), so libnbd
//! clients, which refuse requests that break an advertised minimum before
//! sending them, can read and write any byte range. `--strict-alignment`
//! advertises the alignment as the minimum for clients that want it.
//! These are the calls libnbd's own synch-parallel and aio-parallel tests
//! make (unaligned requests from several connections, checked against a
//! model); both were also run unmodified (see the closing notes).

mod common;

use common::*;

const MIB: u64 = 1 << 20;

fn o_direct_export(dir: &TempDir) -> String {
    let path = dir.path("disk.img");
    // A size that is a multiple of 4096, so only the advertisement decides.
    std::fs::write(&path, random_bytes(16 * MIB as usize, 3)).unwrap();
    path.display().to_string()
}

const SEVEN_AT_100: &str = r#"
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print(h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED))
try:
    h.pwrite(b"1234567", 100)
    assert h.pread(7, 100) == b"1234567"
    assert h.pread(3, 102) == b"345"
    print("ok")
except nbd.Error as e:
    print("refused:", e)
"#;

#[test]
fn a_libnbd_client_writes_7_bytes_at_offset_100_on_o_direct() {
    if !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("align7");
    let path = o_direct_export(&dir);
    let mut server = Server::start(&[&path]);
    let out = python(SEVEN_AT_100, &[server.uri()]);
    let lines: Vec<&str> = out.lines().collect();
    let sizes: Vec<u32> = lines[0].split(' ').map(|n| n.parse().unwrap()).collect();
    assert_eq!(sizes[0], 1, "minimum block size");
    assert!(sizes[1] >= 4096 && sizes[1].is_power_of_two(), "preferred {}", sizes[1]);
    assert_eq!(lines[1], "ok", "{out}");
    assert_eq!(server.stop(), Some(0));
    // The same with nbdsh, as a user would type it.
    if require("nbdsh") {
        let mut server = Server::start(&[&path]);
        // nbdsh runs the first python3 on PATH; python3-libnbd is Debian's.
        let out = std::process::Command::new("nbdsh")
            .args(["-u", server.uri(), "-c", "h.pwrite(b'abcdefg', 100); print(bytes(h.pread(7, 100)))"])
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("run nbdsh");
        assert!(out.status.success(), "nbdsh: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "b'abcdefg'");
        assert_eq!(server.stop(), Some(0));
    }
}

#[test]
fn strict_alignment_is_available_and_libnbd_then_refuses_client_side() {
    if !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("align-strict");
    let path = o_direct_export(&dir);
    let mut server = Server::start(&[&path, "--strict-alignment"]);
    let out = python(SEVEN_AT_100, &[server.uri()]);
    let minimum: u32 = out.split_whitespace().next().unwrap().parse().unwrap();
    assert!(minimum >= 512, "strict minimum {minimum}");
    assert!(out.contains("refused"), "{out}");
    assert_eq!(server.stop(), Some(0));
}

/// Eight connections, each issuing random unaligned reads and writes in its
/// own area for a few seconds, checked against a model at the end.
const PARALLEL: &str = r#"
import random, sys, threading, time
import nbd
uri, size, threads = sys.argv[1], int(sys.argv[2]), 8
area = size // threads
errors = []
def worker(i):
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        rng = random.Random(i)
        base = i * area
        model = bytearray(h.pread(area, base))
        end = time.time() + 3
        ops = 0
        while time.time() < end:
            off = rng.randrange(0, area - 1)
            n = rng.randrange(1, min(65536, area - off))
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                h.pwrite(data, base + off)
                model[off:off + n] = data
            else:
                got = h.pread(n, base + off)
                if got != bytes(model[off:off + n]):
                    errors.append(f"thread {i}: read at {base + off} differs")
                    return
            ops += 1
        if h.pread(area, base) != bytes(model):
            errors.append(f"thread {i}: final contents differ")
        h.shutdown()
    except Exception as e:
        errors.append(f"thread {i}: {e}")
ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print("\n".join(errors) if errors else "ok")
"#;

#[test]
fn parallel_unaligned_requests_from_eight_connections_match_a_model() {
    if !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("align-parallel");
    let path = o_direct_export(&dir);
    let mut server = Server::start(&[&path]);
    let out = python(PARALLEL, &[server.uri(), &(16 * MIB).to_string()]);
    assert_eq!(out.trim(), "ok");
    assert_eq!(server.stop(), Some(0));
}
