//! Layered exports (issue 10), end to end: a three-layer chain built as
//! raw layers for ringnbd and as the equivalent qcow2 chain for
//! `qemu-nbd -A`, compared through `nbdinfo --map` (qemu:allocation-depth
//! and base:allocation) and nbdcopy; `ctl commit`; random unaligned
//! operations against a model on ext4 (O_DIRECT) and tmpfs; kill -9 during
//! writes; throwaway tops; and the errors.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Every byte of the export at `uri`, read by nbdcopy.
fn read_all(uri: &str) -> Vec<u8> {
    let out = Command::new("nbdcopy").args([uri, "-"]).output().unwrap();
    assert!(out.status.success(), "nbdcopy {uri}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Adjacent runs with one status merged: servers may split runs where
/// they like; the status of every byte is what must agree.
fn merged(runs: Vec<(u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (offset, length, status) in runs {
        match out.last_mut() {
            Some(last) if last.2 == status && last.0 + last.1 == offset => last.1 += length,
            _ => out.push((offset, length, status)),
        }
    }
    out
}

fn ctl_ok(control: &Path, args: &[&str]) -> Value {
    let (reply, code) = ctl_reply(control, args);
    assert!(code == 0 && reply["ok"] == Value::Bool(true), "ctl {args:?}: {reply}");
    reply["result"].clone()
}

/// A base image: a pattern in its first half, a hole, data near the end.
fn base_image(path: &Path) {
    let uri_less = path.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "raw", uri_less, &SIZE.to_string()]);
    qemu_io(uri_less, &["write -P 0xa1 0 6M".into(), "write -P 0xa2 12M 1M".into()]);
}

/// The writes that make each generation of the chain: whole chunks,
/// partial and unaligned ones across chunk boundaries, zeroes that may
/// punch, and writes into the base's hole.
fn generation(seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for _ in 0..40 {
        let offset = rng.below(SIZE - 300 * KIB);
        let length = 1 + rng.below(200 * KIB);
        let pattern = 1 + rng.below(250);
        out.push(match rng.below(6) {
            0 => format!("write -z -u {} {}", offset / 4096 * 4096, length.div_ceil(4096) * 4096),
            _ => format!("write -P {pattern} {offset} {length}"),
        });
    }
    out
}

struct QemuNbd {
    child: std::process::Child,
    uri: String,
}

impl QemuNbd {
    fn start(dir: &Path, image: &Path) -> QemuNbd {
        let socket = dir.join("qemu.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("qemu-nbd")
            .args(["-A", "-t", "--discard=unmap", "-f", "qcow2", "-x", "vm", "-k"])
            .arg(&socket)
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd starts");
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, uri: format!("nbd+unix:///vm?socket={}", socket.display()) }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Both servers' views agree on allocation depth and data exactly, and on
/// allocation as far as the formats let them: qcow2 allocates whole
/// 64 KiB clusters and reports the never-written part of a partly written
/// cluster as data, where the raw top keeps a hole. So where the two
/// `base:allocation` answers differ, ringnbd must be the one reporting
/// zeroes, and the bytes must read as zeroes.
fn assert_same_view(ours: &str, qemu: &str, what: &str) {
    let context = "qemu:allocation-depth";
    assert_eq!(merged(map(ours, context)), merged(map(qemu, context)), "{what}: {context} differs from qemu-nbd -A");
    let (data, theirs_data) = (read_all(ours), read_all(qemu));
    assert_eq!(data.len() as u64, SIZE);
    assert!(data == theirs_data, "{what}: data read through ringnbd differs from qemu-nbd's");
    let (mine, theirs) = (map(ours, "base:allocation"), map(qemu, "base:allocation"));
    let status_at = |runs: &[(u64, u64, u64)], at: u64| -> (u64, u64) {
        let r = runs.iter().find(|r| r.0 <= at && at < r.0 + r.1).expect("maps cover the export");
        (r.2, r.0 + r.1)
    };
    let (mut at, mut same) = (0, 0);
    while at < SIZE {
        let ((m, m_end), (t, t_end)) = (status_at(&mine, at), status_at(&theirs, at));
        let end = m_end.min(t_end);
        if m == t {
            same += end - at;
        } else {
            assert!(m & 2 != 0, "{what}: at {at}..{end} ringnbd says {m}, qemu {t}: only zeroes may differ");
            assert!(data[at as usize..end as usize].iter().all(|&b| b == 0), "{what}: {at}..{end} reported zero");
        }
        for (runs, who) in [(&mine, "ringnbd"), (&theirs, "qemu")] {
            if status_at(runs, at).0 & 2 != 0 {
                assert!(data[at as usize..end as usize].iter().all(|&b| b == 0), "{what}: {who} claims zeroes at {at}");
            }
        }
        at = end;
    }
    // Not a vacuous comparison: differences are the edges of partly written clusters.
    assert!(same * 10 >= SIZE * 9, "{what}: base:allocation agrees on only {same} of {SIZE} bytes");
}

#[test]
fn a_raw_layer_chain_matches_the_qcow2_chain_and_commit_folds_the_top_down() {
    if !["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"].into_iter().all(require) {
        return;
    }
    let dir = TempDir::new("layers-qemu");
    let (base, mid, top) = (dir.path("base.raw"), dir.path("mid.raw"), dir.path("top.raw"));
    base_image(&base);
    let (mid_q, top_q) = (dir.path("mid.qcow2"), dir.path("top.qcow2"));
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &s(&base), "-F", "raw", &s(&mid_q)]);

    // Generation 1: the middle layer, written through a two-layer export.
    {
        let server = Server::start(&[&format!("vm=layers:{},{}", s(&mid), s(&base))]);
        let qemu = QemuNbd::start(dir.0.as_path(), &mid_q);
        let ours = server.export_uri("vm");
        for uri in [&ours, &qemu.uri] {
            qemu_io(uri, &generation(1));
        }
        assert_same_view(&ours, &qemu.uri, "two layers");
    }
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &s(&mid_q), "-F", "qcow2", &s(&top_q)]);

    // Generation 2 on a three-layer chain, with discards that must hide
    // what the layers below hold.
    let control = dir.path("ctl.sock");
    let server =
        Server::start(&["--control", &s(&control), &format!("vm=layers:{},{},{}", s(&top), s(&mid), s(&base))]);
    let ours = server.export_uri("vm");
    {
        let qemu = QemuNbd::start(dir.0.as_path(), &top_q);
        let mut writes = generation(2);
        writes.push("discard 1M 256K".into());
        writes.push("discard 12M 128K".into());
        for uri in [&ours, &qemu.uri] {
            qemu_io(uri, &writes);
        }
        assert_same_view(&ours, &qemu.uri, "three layers");
        let depths = merged(map(&ours, "qemu:allocation-depth"));
        for depth in [1, 2, 3] {
            assert!(depths.iter().any(|r| r.2 == depth), "depth {depth} appears in {depths:?}");
        }
        qemu_io(&ours, &["read -P 0 1M 256K".into(), "read -P 0 12M 128K".into()]);
    }

    // Commit: the middle layer then reads as the composed view.
    let composed = read_all(&ours);
    let status = ctl_ok(&control, &["status"]);
    let top_chunks = status["exports"][0]["layers"]["top_chunks"].as_u64().unwrap();
    assert!(top_chunks > 0);
    let committed = ctl_ok(&control, &["commit", "vm"]);
    assert_eq!(committed["chunks"].as_u64(), Some(top_chunks));
    assert_eq!(committed["into"].as_str(), Some(s(&mid).as_str()));
    assert!(read_all(&ours) == composed, "commit changes no view");
    let folded = Server::start(&["-r", &format!("mid=layers:{},{}", s(&mid), s(&base))]);
    let below = read_all(&folded.export_uri("mid"));
    assert!(below == composed, "after commit the layer below equals the composed view");
    let (reply, code) = ctl_reply(&control, &["commit", "nope"]);
    assert_eq!((code, reply["error"]["kind"].as_str()), (1, Some("unknown-export")));
}

const PY_RANDOM_OPS: &str = r#"
import nbd, random, sys
uri, start, ops, seed, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = bytearray(open(start, 'rb').read())
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
assert size == len(model)
for i in range(ops):
    op = rng.randrange(10)
    off = rng.randrange(size - 1)
    n = 1 + rng.randrange(min(size - off, 300 * 1024))
    if op < 4:
        data = bytes([rng.randrange(1, 256)]) * n
        h.pwrite(data, off)
        model[off:off + n] = data
    elif op == 4:
        h.zero(n, off)
        model[off:off + n] = bytes(n)
    elif op == 5:
        h.trim(n, off)
        model[off:off + n] = bytes(n)
    elif op == 6:
        h.flush()
    else:
        got = h.pread(n, off)
        if got != model[off:off + n]:
            bad = next(k for k in range(n) if got[k] != model[off + k])
            sys.exit("op %d: read %d@%d differs at byte %d" % (i, n, off, off + bad))
assert h.pread(size, 0) == model, "whole image differs from the model"
open(end, 'wb').write(model)
print("ok")
"#;

/// Two rounds of random operations checked against a model that starts
/// as the base's bytes: the second after a restart, over the Unix socket,
/// so the top and its map are read back from disk.
fn random_ops_on(dir: &Path, direct: bool) {
    let (base, top) = (dir.join("base.raw"), dir.join("top.raw"));
    make_source(&base, SIZE, 7);
    let before = file_bytes(&base);
    let spec = format!("layers:{},{}", top.display(), base.display());
    let mut args = vec![spec.as_str()];
    if !direct {
        args.push("--no-direct");
    }
    let mut model = base.clone();
    for (round, transport) in [Transport::Tcp, Transport::Unix].into_iter().enumerate() {
        let server = Server::start(&args);
        let next = dir.join(format!("model{round}"));
        let (seed, next_s) = (round.to_string(), next.to_str().unwrap().to_owned());
        let out =
            python(PY_RANDOM_OPS, &[&uri(&server, transport, ""), model.to_str().unwrap(), "500", &seed, &next_s]);
        assert_eq!(out.trim(), "ok");
        model = next;
    }
    assert!(file_bytes(&base) == before, "the lower layer is never written");
}

#[test]
fn random_unaligned_operations_match_a_model_on_ext4_with_o_direct() {
    if !require("nbdcopy") {
        return;
    }
    let dir = TempDir::new("layers-model");
    random_ops_on(dir.0.as_path(), true);
}

#[test]
fn random_unaligned_operations_match_a_model_on_tmpfs() {
    if !require("nbdcopy") {
        return;
    }
    let dir = std::path::PathBuf::from(format!("/dev/shm/ringnbd-layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    random_ops_on(&dir, false);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes random ranges until killed, journaling each as begun ("B offset
/// length byte") and, once acknowledged, done ("D").
const PY_JOURNALED_WRITES: &str = r#"
import nbd, random, sys
uri, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
for i in range(100000):
    off = rng.randrange(size - 1)
    n = 1 + rng.randrange(min(size - off, 200 * 1024))
    byte = rng.randrange(1, 256)
    print("B %d %d %d" % (off, n, byte), flush=True)
    if rng.randrange(8) == 0:
        h.zero(n, off)
        byte = 0
    else:
        h.pwrite(bytes([byte]) * n, off)
    print("D %d" % byte, flush=True)
"#;

#[test]
fn kill_9_during_copy_up_loses_no_acknowledged_write() {
    if !require("nbdcopy") {
        return;
    }
    let dir = TempDir::new("layers-crash");
    let (base, top) = (dir.path("base.raw"), dir.path("top.raw"));
    let mut model = make_source(&base, SIZE, 11);
    let spec = format!("layers:{},{}", top.display(), base.display());
    let mut rng = Rng(std::process::id() as u64);
    let rounds = 4;
    for round in 0..rounds {
        let mut server = Server::start(&[&spec]);
        let mut writer = Command::new(PYTHON)
            .args(["-c", PY_JOURNALED_WRITES, &server.export_uri(""), &round.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let journal = BufReader::new(writer.stdout.take().unwrap());
        let killer = {
            let pid = server.pid();
            let after = Duration::from_millis(150 + rng.below(500));
            std::thread::spawn(move || {
                std::thread::sleep(after);
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            })
        };
        // Replay acknowledged writes into the model; the one in flight at
        // the kill may have landed, in part or not at all.
        let (mut pending, mut acknowledged) = (None, 0);
        for line in journal.lines().map_while(Result::ok) {
            let fields: Vec<u64> = line[2..].split(' ').map(|f| f.parse().unwrap()).collect();
            match line.as_bytes()[0] {
                b'B' => pending = Some((fields[0] as usize, fields[1] as usize)),
                _ => {
                    let (offset, length) = pending.take().expect("D follows B");
                    model[offset..offset + length].fill(fields[0] as u8);
                    acknowledged += 1;
                }
            }
        }
        killer.join().unwrap();
        let _ = writer.wait();
        server.kill9();
        assert!(acknowledged > 0, "round {round}: some writes were acknowledged before the kill");

        let server = Server::start(&[&spec]);
        let now = read_all(&server.export_uri(""));
        assert_eq!(now.len(), model.len());
        let unknown = pending.map_or(0..0, |(offset, length)| offset..offset + length);
        let lost = (0..model.len()).find(|i| !unknown.contains(i) && now[*i] != model[*i]);
        assert_eq!(lost, None, "round {round}: after kill -9 ({acknowledged} acknowledged), a byte differs");
        model = now;
    }
    assert!(file_bytes(&base) == make_source_bytes(SIZE, 11), "the lower layer is never written");
}

/// `make_source`'s bytes without writing a file.
fn make_source_bytes(size: u64, seed: u64) -> Vec<u8> {
    let dir = TempDir::new("layers-source");
    make_source(&dir.path("x"), size, seed)
}

#[test]
fn a_throwaway_top_leaves_no_file_and_forgets_writes_unless_committed() {
    if !["qemu-io", "nbdcopy"].into_iter().all(require) {
        return;
    }
    let dir = TempDir::new("layers-throwaway");
    let (base, tmp) = (dir.path("base.raw"), dir.path("tmp"));
    std::fs::create_dir(&tmp).unwrap();
    let original = make_source(&base, SIZE, 5);
    let control = dir.path("ctl.sock");
    let spec = format!("disk=throwaway:{}", base.display());
    let args = ["--control", control.to_str().unwrap(), &spec];
    let launch = Launch { env: vec![("TMPDIR", tmp.to_str().unwrap())], ..Launch::new(&args) };
    let writes = ["write -P 0x5a 100000 300000".to_owned(), "discard 8M 1M".to_owned()];
    {
        let server = Server::launch(&launch);
        let uri = server.export_uri("disk");
        qemu_io(&uri, &writes);
        qemu_io(&uri, &["read -P 0x5a 100000 300000".into(), "read -P 0 8M 1M".into()]);
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "the temporary top is unlinked at once");
        let status = ctl_ok(&control, &["status"]);
        assert_eq!(status["exports"][0]["layers"]["throwaway"], Value::Bool(true));
        let depths = merged(map(&uri, "qemu:allocation-depth"));
        assert_eq!(
            depths.iter().filter(|r| r.2 == 1).map(|r| r.1).sum::<u64>(),
            6 * 65536 + MIB,
            "chunks 1..=6 and the discarded MiB"
        );
    }
    assert!(file_bytes(&base) == original, "a throwaway export never writes its image");
    {
        let server = Server::launch(&launch);
        let now = read_all(&server.export_uri("disk"));
        assert!(now == original, "writes of an earlier run are gone");
        // Unless committed: then they are in the image.
        qemu_io(&server.export_uri("disk"), &writes);
        let composed = read_all(&server.export_uri("disk"));
        ctl_ok(&control, &["commit", "disk"]);
        assert!(file_bytes(&base) == composed, "commit writes the composed view into the image");
    }
}

#[test]
fn layer_errors_are_refused_clearly() {
    if !require("nbdinfo") {
        return;
    }
    let dir = TempDir::new("layers-errors");
    let base = dir.path("base.raw");
    sparse_file(&base, 4 * MIB);
    let refused = |spec: &str| -> String {
        let out = run("timeout", &["20", &binary(), "-l", "127.0.0.1:0", spec]);
        assert!(!out.status.success(), "{spec} must be refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A top that exists without its map: whose bytes are whose is unknown.
    let plain = dir.path("plain.raw");
    sparse_file(&plain, 4 * MIB);
    let message = refused(&format!("layers:{},{}", plain.display(), base.display()));
    assert!(message.contains("has no layer map"), "{message}");
    // A map that records another size.
    let top = dir.path("top.raw");
    drop(Server::start(&[&format!("layers:{},{}", top.display(), base.display())]));
    let grown = dir.path("big.raw");
    sparse_file(&grown, 8 * MIB);
    let moved = dir.path("moved.raw");
    sparse_file(&moved, 8 * MIB);
    std::fs::copy(format!("{}.layer", top.display()), format!("{}.layer", moved.display())).unwrap();
    let message = refused(&format!("layers:{},{}", moved.display(), grown.display()));
    assert!(message.contains("records a layer of 4194304 bytes"), "{message}");
    let message = refused(&format!("layers:{}", base.display()));
    assert!(message.contains("layers:TOP,LOWER"), "{message}");
    let message = refused(&format!("layers:{},{}", top.display(), dir.path("missing.raw").display()));
    assert!(message.contains("missing.raw"), "{message}");

    // Only layered exports offer allocation depth; commit needs layers.
    let control = dir.path("ctl.sock");
    let server = Server::start(&[
        "--control",
        control.to_str().unwrap(),
        &format!("flat={}", base.display()),
        &format!("vm=layers:{},{}", top.display(), base.display()),
    ]);
    let info: Value = serde_json::from_str(&run_ok("nbdinfo", &["--json", "--list", &server.export_uri("")])).unwrap();
    for export in info["exports"].as_array().unwrap() {
        let contexts: Vec<&str> = export["contexts"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        let layered = export["export-name"] == "vm";
        assert_eq!(contexts.contains(&"qemu:allocation-depth"), layered, "{export}");
    }
    let (reply, code) = ctl_reply(&control, &["commit", "flat"]);
    assert_eq!((code, reply["error"]["kind"].as_str()), (1, Some("not-layered")));
}

#[test]
fn concurrent_first_writes_to_shared_chunks_copy_each_up_once_and_lose_nothing() {
    if !require("nbdcopy") {
        return;
    }
    let dir = TempDir::new("layers-race");
    let (base, top) = (dir.path("base.raw"), dir.path("top.raw"));
    let mut expect = make_source(&base, SIZE, 3);
    let control = dir.path("ctl.sock");
    let spec = format!("layers:{},{}", top.display(), base.display());
    let server = Server::start(&["--control", control.to_str().unwrap(), &spec]);
    let (writers, stripes) = (4, 8 * MIB / 4096);
    // Every stripe write covers part of a chunk that no one holds yet, and
    // the four writers (on both workers) race for each chunk.
    write_stripes(&server.export_uri(""), writers, stripes);
    for s in 0..stripes as usize {
        expect[s * 4096..s * 4096 + 3000].fill(stripe_byte(s, writers));
    }
    let now = read_all(&server.export_uri(""));
    let differs = (0..now.len()).find(|&i| now[i] != expect[i]);
    assert_eq!(differs, None, "a stripe, or the old bytes around it, was lost to a racing copy-up");
    let status = ctl_ok(&control, &["status"]);
    let layers = &status["exports"][0]["layers"];
    assert_eq!(layers["top_chunks"].as_u64(), Some(8 * MIB / 65536));
    assert_eq!(layers["chunks_copied_up"].as_u64(), Some(8 * MIB / 65536), "each chunk copied up exactly once");
}
