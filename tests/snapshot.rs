//! Point-in-time snapshot exports (issue 10), end to end: a reflink
//! snapshot on an xfs file system the test makes and loop-mounts, read
//! whole by nbdcopy while qemu-io writes to the live export; its
//! `base:allocation` and change contexts as of the snapshot; listing,
//! deletion, removal at exit and after a crash; and the errors.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const G: u64 = 64 * 1024;

/// The granules of the default tracking granularity a map marks changed.
fn dirty_granules(runs: &[(u64, u64, u64)]) -> BTreeSet<u64> {
    dirty_granules_of(runs, G)
}
const SIZE: u64 = 64 * MIB;
/// Bytes before it hold pattern A when the snapshot is taken; after it the
/// image is a hole.
const FILLED: u64 = 48 * MIB;
const A: u8 = 0xa1;
const B: u8 = 0xb2;

/// An xfs file system (reflink on) in a loop-mounted file, unmounted on drop.
struct Xfs {
    dir: TempDir,
    mount: PathBuf,
}

impl Xfs {
    fn new() -> Option<Self> {
        if !require("mkfs.xfs") {
            return None;
        }
        let dir = TempDir::new("snapshot-xfs");
        let backing = dir.path("xfs.img");
        sparse_file(&backing, 512 * MIB);
        run_ok("mkfs.xfs", &["-q", "-m", "reflink=1", backing.to_str().unwrap()]);
        let mount = dir.path("mnt");
        std::fs::create_dir(&mount).unwrap();
        run_ok("mount", &["-o", "loop", backing.to_str().unwrap(), mount.to_str().unwrap()]);
        Some(Xfs { dir, mount })
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        // A lazy unmount never fails on a busy mount; the loop device goes
        // with it (mount -o loop sets autoclear).
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = &self.dir;
    }
}

fn ctl_ok(control: &Path, args: &[&str]) -> Value {
    let (reply, code) = ctl_reply(control, args);
    assert_eq!((reply["ok"].clone(), code), (Value::Bool(true), 0), "ctl {args:?}: {reply}");
    reply["result"].clone()
}

/// The error kind of a ctl command that must fail.
fn ctl_error(control: &Path, args: &[&str]) -> String {
    let (reply, code) = ctl_reply(control, args);
    assert_eq!((reply["ok"].clone(), code), (Value::Bool(false), 1), "ctl {args:?} should fail: {reply}");
    reply["error"]["kind"].as_str().unwrap().to_owned()
}

fn export_uri(server: &Server, name: &str) -> String {
    uri(server, Transport::Unix, &name.replace('@', "%40"))
}

/// Random 4 KiB-aligned offsets inside `[from, to)` (seeded).
fn offsets(count: usize, from: u64, to: u64, seed: u64) -> Vec<u64> {
    let bytes = random_bytes(count * 8, seed);
    let blocks = (to - from) / 4096;
    bytes.chunks_exact(8).map(|c| from + u64::from_le_bytes(c.try_into().unwrap()) % blocks * 4096).collect()
}

fn qemu_io_writes(uri: &str, pattern: u8, at: &[u64]) -> std::process::Child {
    let mut args = vec!["-f".to_owned(), "raw".to_owned()];
    for offset in at {
        args.push("-c".into());
        args.push(format!("write -P {pattern} {offset} 4k"));
    }
    args.push(uri.to_owned());
    Command::new("qemu-io").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start qemu-io")
}

fn exports_listed(server: &Server) -> Vec<String> {
    let text = run_ok("nbdinfo", &["--list", "--json", server.unix_uri.as_deref().unwrap()]);
    let list: Value = serde_json::from_str(&text).unwrap();
    list["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap().to_owned()).collect()
}

fn clients_present() -> bool {
    require("nbdcopy") && require("nbdinfo") && require("qemu-io")
}

#[test]
fn a_reflink_snapshot_on_xfs_reads_as_the_export_did_while_writes_go_on() {
    let Some(xfs) = Xfs::new() else { return };
    if clients_present() {
        snapshot_while_writing(&xfs.mount, "reflink");
    }
}

#[test]
fn a_copy_before_write_snapshot_on_ext4_reads_as_the_export_did_while_writes_go_on() {
    // /tmp is ext4 on the test machines.
    let dir = TempDir::new("snapshot-ext4");
    if clients_present() {
        snapshot_while_writing(&dir.0, "copy-before-write");
    }
}

#[test]
fn a_copy_before_write_snapshot_on_tmpfs_reads_as_the_export_did_while_writes_go_on() {
    let dir = ShmDir::new("snapshot-tmpfs");
    if clients_present() {
        snapshot_while_writing(&dir.0, "copy-before-write");
    }
}

/// A directory on tmpfs, removed on drop.
struct ShmDir(PathBuf);

impl ShmDir {
    fn new(tag: &str) -> Self {
        let path = Path::new("/dev/shm").join(format!("ringnbd-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        ShmDir(path)
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pattern A, a checkpoint, writes, a snapshot, then pattern B written in
/// batches while nbdcopy reads the snapshot whole twice; then the
/// snapshot's allocation and change contexts, listing, deletion, removal
/// at a clean stop and after kill -9. `kind`: how the file system holds it.
fn snapshot_while_writing(dir: &Path, kind: &str) {
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![A; FILLED as usize]).unwrap();
    std::fs::File::options().write(true).open(&image).unwrap().set_len(SIZE).unwrap();
    let control = dir.join("ctl.sock");
    let server =
        Server::start(&["--track", "--control", control.to_str().unwrap(), &format!("disk={}", image.display())]);
    let live = export_uri(&server, "disk");

    // Changes between checkpoint c0 and the snapshot: the snapshot's
    // qemu:dirty-bitmap:c0 must show these and nothing written later.
    ctl_ok(&control, &["checkpoint", "create", "disk", "c0"]);
    let before = offsets(40, 0, FILLED, 1);
    let status = qemu_io_writes(&live, A, &before).wait().unwrap();
    assert!(status.success());

    let created = ctl_ok(&control, &["snapshot", "create", "disk", "s1"]);
    assert_eq!(created["snapshot"]["name"], "disk@s1");
    assert_eq!(created["snapshot"]["kind"], kind);
    assert_eq!(created["checkpoint"]["name"], "s1");
    let clone = PathBuf::from(created["snapshot"]["file"].as_str().unwrap());
    assert!(clone.starts_with(dir) && clone.exists(), "held beside the image: {clone:?}");
    assert!(exports_listed(&server).contains(&"disk@s1".to_owned()));
    let snapshot = export_uri(&server, "disk@s1");

    // Pattern B everywhere (the hole too), in batches for as long as
    // nbdcopy reads the snapshot whole, twice.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, live) = (std::sync::Arc::clone(&stop), live.clone());
        std::thread::spawn(move || {
            let mut written = Vec::new();
            for batch in 0..200u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let at = offsets(200, 0, SIZE, 100 + batch);
                assert!(qemu_io_writes(&live, B, &at).wait().unwrap().success());
                written.extend(at);
            }
            written
        })
    };
    for round in 0..2 {
        let copy = dir.join(format!("copy{round}"));
        run_ok("nbdcopy", &[&snapshot, copy.to_str().unwrap()]);
        let bytes = std::fs::read(&copy).unwrap();
        assert_eq!(bytes.len() as u64, SIZE);
        let first_a = bytes[..FILLED as usize].iter().position(|&b| b != A);
        assert_eq!(first_a, None, "round {round}: the snapshot's data is pattern A");
        assert!(bytes[FILLED as usize..].iter().all(|&b| b == 0), "round {round}: the hole reads as zeroes");
        std::fs::remove_file(&copy).unwrap();
    }
    assert!(!writer.is_finished(), "the writes went on for the whole read");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let during = writer.join().unwrap();
    assert!(!during.is_empty());
    let now = dir.join("live");
    run_ok("nbdcopy", &[&live, now.to_str().unwrap()]);
    let bytes = std::fs::read(&now).unwrap();
    for &offset in &during {
        assert!(bytes[offset as usize..offset as usize + 4096].iter().all(|&b| b == B), "live write at {offset}");
    }

    // base:allocation as of the snapshot: the hole the live export no
    // longer has.
    let hole_bytes = |uri: &str| -> u64 {
        map(uri, "base:allocation").iter().filter(|r| r.0 >= FILLED && r.2 & 1 != 0).map(|r| r.1).sum()
    };
    assert_eq!(hole_bytes(&snapshot), SIZE - FILLED, "the snapshot keeps the hole");
    assert!(hole_bytes(&live) < SIZE - FILLED, "the live export was written there");

    // Changes since c0 as of the snapshot: exactly the writes before it.
    let wanted: BTreeSet<u64> = before.iter().map(|o| o / G).collect();
    assert_eq!(dirty_granules(&map(&snapshot, "qemu:dirty-bitmap:c0")), wanted);
    let live_dirty = dirty_granules(&map(&live, "qemu:dirty-bitmap:c0"));
    assert!(live_dirty.is_superset(&wanted) && live_dirty.len() > wanted.len());
    // ... and the live export's changes since s1 are the writes after it.
    let after: BTreeSet<u64> = during.iter().map(|o| o / G).collect();
    assert_eq!(dirty_granules(&map(&live, "qemu:dirty-bitmap:s1")), after);

    // Listing, then deleting: the export and its clone go, the checkpoint stays.
    let listed = ctl_ok(&control, &["snapshot", "list", "disk"]);
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(ctl_error(&control, &["snapshot", "create", "disk", "s1"]), "duplicate");
    ctl_ok(&control, &["snapshot", "delete", "disk", "s1"]);
    assert!(!clone.exists(), "delete removes the clone");
    assert!(!exports_listed(&server).contains(&"disk@s1".to_owned()));
    assert_eq!(ctl_error(&control, &["snapshot", "delete", "disk", "s1"]), "unknown-snapshot");
    let checkpoints = ctl_ok(&control, &["checkpoint", "list", "disk"]);
    assert!(checkpoints["checkpoints"].as_array().unwrap().iter().any(|c| c["name"] == "s1"));

    // A snapshot still served when the server stops is removed with it.
    let s2 = ctl_ok(&control, &["snapshot", "create", "disk", "s2"]);
    let clone2 = PathBuf::from(s2["snapshot"]["file"].as_str().unwrap());
    assert!(clone2.exists());
    let mut server = server;
    assert_eq!(server.stop(), Some(0));
    assert!(!clone2.exists(), "snapshots last as long as the server");

    // After kill -9 the clone stays behind until the image is served again.
    let args = ["--track", "--control", control.to_str().unwrap(), &format!("disk={}", image.display())];
    let mut server = Server::start(&args);
    let s3 = ctl_ok(&control, &["snapshot", "create", "disk", "s3"]);
    let clone3 = PathBuf::from(s3["snapshot"]["file"].as_str().unwrap());
    server.kill9();
    assert!(clone3.exists());
    let server = Server::start(&args);
    assert!(!clone3.exists(), "a crashed run's clone is removed at start");
    assert!(!exports_listed(&server).contains(&"disk@s3".to_owned()));
}

#[test]
fn snapshots_that_cannot_be_taken_are_refused_and_stale_files_go() {
    let dir = TempDir::new("snapshot-refused");
    let image = dir.path("disk.img");
    sparse_file(&image, 16 * MIB);
    // A clone a killed run left behind goes when the image is served again.
    let stale = dir.path("disk.img.ringnbd-snapshot.3");
    std::fs::write(&stale, b"old").unwrap();
    let control = dir.path("ctl.sock");
    let server = Server::start(&[
        "--track",
        "--control",
        control.to_str().unwrap(),
        &format!("disk={}", image.display()),
        "mem=memory:16M",
    ]);
    assert!(!stale.exists(), "stale clone removed at start");
    assert_eq!(ctl_error(&control, &["snapshot", "create", "mem", "s1"]), "unsupported");
    assert_eq!(ctl_error(&control, &["snapshot", "create", "nope", "s1"]), "unknown-export");
    assert_eq!(ctl_error(&control, &["snapshot", "create", "disk", "has space"]), "bad-name");
    assert_eq!(ctl_error(&control, &["snapshot", "list", "nope"]), "unknown-export");
    assert!(ctl_ok(&control, &["snapshot", "list"])["snapshots"].as_array().unwrap().is_empty());
    // Writes were never held up by the refusals.
    if require("qemu-io") {
        run_ok("qemu-io", &["-f", "raw", "-c", "write -P 9 0 64k", &uri(&server, Transport::Unix, "disk")]);
    }
}

/// A server on a 16 MiB image of pattern A in `dir` with `extra` options,
/// its control socket and the live export's URI.
fn serve_pattern_a(dir: &Path, extra: &[&str]) -> (Server, PathBuf, String) {
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![A; 16 * MIB as usize]).unwrap();
    let control = dir.join("ctl.sock");
    let mut args = vec!["--track".to_owned(), "--control".into(), control.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(format!("disk={}", image.display()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&refs);
    let live = export_uri(&server, "disk");
    (server, control, live)
}

fn qemu_io_write(uri: &str, pattern: u8, offset: u64, length: u64) -> std::process::Output {
    run("qemu-io", &["-f", "raw", "-c", &format!("write -P {pattern} {offset} {length}"), uri])
}

fn wrote(output: &std::process::Output) -> bool {
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    output.status.success() && text.contains("wrote") && !text.contains("failed")
}

#[test]
fn a_full_scratch_breaks_the_snapshot_not_the_live_export_or_refuses_writes_if_asked() {
    if !clients_present() {
        return;
    }
    // Breaking (the default): 4 chunks of scratch, then 8 chunks written.
    let dir = TempDir::new("snapshot-scratch-break");
    let (server, control, live) = serve_pattern_a(&dir.0, &["--snapshot-scratch-max", "256K"]);
    ctl_ok(&control, &["snapshot", "create", "disk", "s"]);
    let snapshot = export_uri(&server, "disk@s");
    let out = dir.path("copy");
    run_ok("nbdcopy", &[&snapshot, out.to_str().unwrap()]);
    for chunk in 0..8 {
        assert!(wrote(&qemu_io_write(&live, B, chunk * G, 4096)), "live write {chunk} succeeds");
    }
    let listed = ctl_ok(&control, &["snapshot", "list"]);
    assert_eq!(listed["snapshots"][0]["broken"], true, "{listed}");
    assert!(listed["snapshots"][0]["scratch_bytes"].as_u64().unwrap() <= 256 * 1024);
    let read = run("nbdcopy", &[&snapshot, out.to_str().unwrap()]);
    assert!(!read.status.success(), "reads of a broken snapshot fail");
    let text = std::fs::read_to_string(&server.log).unwrap();
    assert!(text.contains("snapshot \"disk@s\" is broken"), "logged: {text}");
    let now = dir.path("now");
    run_ok("nbdcopy", &[&live, now.to_str().unwrap()]);
    let bytes = std::fs::read(&now).unwrap();
    for chunk in 0..8u64 {
        let at = (chunk * G) as usize;
        assert!(bytes[at..at + 4096].iter().all(|&b| b == B), "live data of write {chunk}");
    }
    drop(server);

    // Refusing writes instead: the snapshot stays whole.
    let dir = TempDir::new("snapshot-scratch-refuse");
    let (server, control, live) =
        serve_pattern_a(&dir.0, &["--snapshot-scratch-max", "128K", "--snapshot-scratch-full", "fail-writes"]);
    ctl_ok(&control, &["snapshot", "create", "disk", "s"]);
    assert!(wrote(&qemu_io_write(&live, B, 0, 4096)));
    assert!(wrote(&qemu_io_write(&live, B, G, 4096)));
    let refused = qemu_io_write(&live, B, 2 * G, 4096);
    assert!(!wrote(&refused), "the third chunk does not fit");
    assert!(String::from_utf8_lossy(&refused.stdout).contains("No space left"), "{refused:?}");
    assert!(wrote(&qemu_io_write(&live, B, 100, 4096)), "preserved chunks take writes");
    let copy = dir.path("copy");
    run_ok("nbdcopy", &[&export_uri(&server, "disk@s"), copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap().iter().all(|&b| b == A), "the snapshot is whole");
    assert_eq!(ctl_ok(&control, &["snapshot", "list"])["snapshots"][0]["broken"], false);
}

#[test]
fn kill_9_during_copy_before_write_loses_no_acknowledged_live_write() {
    if !clients_present() {
        return;
    }
    let dir = TempDir::new("snapshot-kill");
    let image = dir.path("disk.img");
    let mut rng = Rng(9);
    let mut acknowledged_total = 0;
    for round in 0..5u64 {
        let (mut server, control, live) = if round == 0 {
            serve_pattern_a(&dir.0, &[])
        } else {
            let control = dir.path("ctl.sock");
            let args = ["--track", "--control", control.to_str().unwrap(), &format!("disk={}", image.display())];
            let server = Server::start(&args);
            let live = export_uri(&server, "disk");
            (server, control, live)
        };
        ctl_ok(&control, &["snapshot", "create", "disk", &format!("s{round}")]);
        // Batches of writes to fresh chunks (each needs a copy) until the
        // kill; only batches qemu-io finished are acknowledged.
        let pattern = 0x10 + round as u8;
        let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = {
            let (acknowledged, live) = (std::sync::Arc::clone(&acknowledged), live.clone());
            let seed = rng.next();
            std::thread::spawn(move || {
                for batch in 0..50u64 {
                    let at = offsets(50, 0, 16 * MIB, seed + batch);
                    if !qemu_io_writes(&live, pattern, &at).wait().unwrap().success() {
                        break; // killed under it
                    }
                    acknowledged.lock().unwrap().extend(at);
                }
            })
        };
        // Killed at a random moment once the first batch is in (bounded:
        // a slow machine must not turn the round into a no-op).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while acknowledged.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.below(200)));
        server.kill9();
        writer.join().unwrap();
        let acknowledged = acknowledged.lock().unwrap().clone();
        acknowledged_total += acknowledged.len();
        let bytes = std::fs::read(&image).unwrap();
        // A later batch may overwrite an earlier one's block with the same
        // pattern only: every acknowledged block holds this round's pattern.
        for &offset in &acknowledged {
            let block = &bytes[offset as usize..offset as usize + 4096];
            assert!(block.iter().all(|&b| b == pattern), "round {round}: acknowledged write at {offset} lost");
        }
    }
    assert!(acknowledged_total > 0, "some writes were acknowledged before the kills");
    let leftovers = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("ringnbd-snapshot"));
    assert!(leftovers.count() <= 1, "each restart removes the previous run's scratch");
}

#[test]
fn three_generations_of_incremental_backup_from_snapshots_while_fio_writes() {
    if !(clients_present() && require("fio")) {
        return;
    }
    let dir = TempDir::new("snapshot-generations");
    let image = dir.path("disk.img");
    make_source(&image, 32 * MIB, 77);
    let control = dir.path("ctl.sock");
    let server =
        Server::start(&["--track", "--control", control.to_str().unwrap(), &format!("disk={}", image.display())]);
    let live = export_uri(&server, "disk");
    // fio keeps writing to the live export for the whole test. As a thread
    // (--thread), so killing fio stops the job too: a forked job process
    // outlives its killed parent and, its server gone, spins on.
    let mut fio = Command::new("fio")
        .args([
            "--name=live",
            "--thread",
            "--ioengine=nbd",
            &format!("--uri={live}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--size=32m",
            "--time_based",
            "--runtime=120",
            "--rate_iops=2000",
        ])
        .current_dir(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fio");
    std::thread::sleep(std::time::Duration::from_millis(300));

    // Generation 1: a full backup from snapshot g1.
    ctl_ok(&control, &["snapshot", "create", "disk", "g1"]);
    let backup = dir.path("backup");
    run_ok("nbdcopy", &[&export_uri(&server, "disk@g1"), backup.to_str().unwrap()]);
    ctl_ok(&control, &["snapshot", "delete", "disk", "g1"]);
    let mut previous = "g1".to_owned();
    for generation in 2..=3 {
        // Until fio has changed something since the previous generation
        // (on a loaded machine it may take a while to start writing).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !map(&live, &format!("qemu:dirty-bitmap:{previous}")).iter().any(|r| r.2 & 1 != 0) {
            assert!(std::time::Instant::now() < deadline, "fio changed nothing since {previous}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let name = format!("g{generation}");
        ctl_ok(&control, &["snapshot", "create", "disk", &name]);
        let snapshot = export_uri(&server, &format!("disk@{name}"));
        // Only the ranges changed since the previous generation move ...
        let changed = map(&snapshot, &format!("qemu:dirty-bitmap:{previous}"));
        let full = dir.path("full");
        run_ok("nbdcopy", &[&snapshot, full.to_str().unwrap()]);
        let (mut restored, truth) = (std::fs::read(&backup).unwrap(), std::fs::read(&full).unwrap());
        let mut moved = 0;
        for &(offset, length, _) in changed.iter().filter(|r| r.2 & 1 != 0) {
            let range = offset as usize..(offset + length) as usize;
            restored[range.clone()].copy_from_slice(&truth[range]);
            moved += length;
        }
        // ... and the restored generation is the snapshot, byte for byte.
        assert!(moved > 0 && moved < 32 * MIB, "generation {generation}: {moved} bytes changed");
        assert!(restored == truth, "generation {generation}: restored image differs from its snapshot");
        std::fs::write(&backup, &restored).unwrap();
        ctl_ok(&control, &["snapshot", "delete", "disk", &name]);
        ctl_ok(&control, &["checkpoint", "delete", "disk", &previous]);
        previous = name;
    }
    assert!(fio.try_wait().unwrap().is_none(), "fio wrote throughout");
    let _ = fio.kill();
    let _ = fio.wait();
}

/// A loop device over a file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn over(file: &Path) -> Option<Self> {
        if !require("losetup") {
            return None;
        }
        let device = run_ok("losetup", &["--find", "--show", file.to_str().unwrap()]);
        Some(LoopDevice(device.trim().to_owned()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_block_device_snapshot_is_copy_before_write_with_its_scratch_in_the_state_dir() {
    if !clients_present() {
        return;
    }
    let dir = TempDir::new("snapshot-blockdev");
    let backing = dir.path("backing.img");
    std::fs::write(&backing, vec![A; 16 * MIB as usize]).unwrap();
    let Some(device) = LoopDevice::over(&backing) else { return };
    let state = dir.path("state");
    std::fs::create_dir(&state).unwrap();
    let control = dir.path("ctl.sock");
    let args =
        ["--state-dir", state.to_str().unwrap(), "--control", control.to_str().unwrap(), &format!("dev={}", device.0)];
    let server = Server::start(&args);
    let created = ctl_ok(&control, &["snapshot", "create", "dev", "s"]);
    assert_eq!(created["snapshot"]["kind"], "copy-before-write");
    let scratch = PathBuf::from(created["snapshot"]["file"].as_str().unwrap());
    assert!(scratch.starts_with(&state) && scratch.exists(), "scratch beside the state file: {scratch:?}");
    let live = export_uri(&server, "dev");
    let at = offsets(200, 0, 16 * MIB, 5);
    assert!(qemu_io_writes(&live, B, &at).wait().unwrap().success());
    let copy = dir.path("copy");
    run_ok("nbdcopy", &[&export_uri(&server, "dev@s"), copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap().iter().all(|&b| b == A), "the device as it was");
    let now = dir.path("now");
    run_ok("nbdcopy", &[&live, now.to_str().unwrap()]);
    let bytes = std::fs::read(&now).unwrap();
    assert!(at.iter().all(|&o| bytes[o as usize] == B), "the live writes landed");
    ctl_ok(&control, &["snapshot", "delete", "dev", "s"]);
    assert!(!scratch.exists());
    drop(server);
}

#[test]
fn a_reader_of_a_deleted_copy_before_write_snapshot_gets_eio_not_new_data() {
    if !(clients_present() && require("nbd-python")) {
        return;
    }
    let dir = TempDir::new("snapshot-deleted-reader");
    let (server, control, live) = serve_pattern_a(&dir.0, &[]);
    ctl_ok(&control, &["snapshot", "create", "disk", "s"]);
    let script = r#"
import nbd, subprocess, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.pread(4096, 0) == b"\xa1" * 4096, "the snapshot before the delete"
subprocess.run(sys.argv[3:], check=True, stdout=subprocess.DEVNULL)
subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 178 0 4k", sys.argv[2]], check=True, stdout=subprocess.DEVNULL)
try:
    data = h.pread(4096, 0)
    print("read", data[:1].hex())
except nbd.Error as e:
    print("error", e.errno)
"#;
    let binary = binary();
    let control = control.to_str().unwrap();
    let out = python(
        script,
        &[
            &export_uri(&server, "disk@s"),
            &live,
            &binary,
            "ctl",
            "--control",
            control,
            "snapshot",
            "delete",
            "disk",
            "s",
        ],
    );
    assert_eq!(out.trim(), "error EIO", "the reader is told, not handed live data");
}

#[test]
fn snapshots_can_be_taken_at_start_for_scripts_without_the_control_socket() {
    if !clients_present() {
        return;
    }
    let dir = TempDir::new("snapshot-at-start");
    let (server, control, live) = serve_pattern_a(&dir.0, &["--snapshot", "disk=boot"]);
    assert!(exports_listed(&server).contains(&"disk@boot".to_owned()));
    assert!(wrote(&qemu_io_write(&live, B, 0, 64 * 1024)));
    let copy = dir.path("copy");
    run_ok("nbdcopy", &[&export_uri(&server, "disk@boot"), copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap().iter().all(|&b| b == A));
    assert_eq!(ctl_ok(&control, &["checkpoint", "list", "disk"])["checkpoints"][0]["name"], "boot");
    drop(server);

    // Nothing to snapshot: the server refuses to start, and says why.
    let image = dir.path("plain.img");
    sparse_file(&image, MIB);
    let out = run(&binary(), &["-U", dir.path("s.sock").to_str().unwrap(), "--snapshot", "x", image.to_str().unwrap()]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--snapshot x: no tracked read-write file export"), "{text}");
}

#[test]
fn racing_first_writes_on_both_workers_preserve_each_chunk_once_and_only_old_data() {
    if !clients_present() {
        return;
    }
    let dir = TempDir::new("snapshot-race");
    let (server, control, live) = serve_pattern_a(&dir.0, &[]);
    ctl_ok(&control, &["snapshot", "create", "disk", "s"]);
    // Four writers race for every 64 KiB chunk of the 16 MiB image: each
    // chunk's first write copies it, and a second copier would copy B.
    let (writers, stripes) = (4, 16 * MIB / 4096);
    write_stripes(&live, writers, stripes);
    let out = dir.path("snapshot.raw");
    run_ok("nbdcopy", &[&export_uri(&server, "disk@s"), out.to_str().unwrap()]);
    let frozen = std::fs::read(&out).unwrap();
    assert!(frozen.iter().all(|&b| b == A), "the snapshot holds only the data of its instant");
    let listed = ctl_ok(&control, &["snapshot", "list"]);
    let snapshot = &listed["snapshots"][0];
    assert_eq!(snapshot["broken"], Value::Bool(false));
    assert_eq!(snapshot["scratch_bytes"].as_u64(), Some(16 * MIB), "every chunk copied exactly once");
    let now = dir.path("live.raw");
    run_ok("nbdcopy", &[&live, now.to_str().unwrap()]);
    let now = std::fs::read(&now).unwrap();
    for s in 0..stripes as usize {
        let stripe = &now[s * 4096..(s + 1) * 4096];
        assert!(stripe[..3000].iter().all(|&b| b == stripe_byte(s, writers)), "stripe {s} as written");
        assert!(stripe[3000..].iter().all(|&b| b == A), "the rest of stripe {s} as it was");
    }
}
