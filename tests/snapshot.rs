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
    Command::new("qemu-io").args(&args).stdout(Stdio::null()).spawn().expect("start qemu-io")
}

fn exports_listed(server: &Server) -> Vec<String> {
    let text = run_ok("nbdinfo", &["--list", "--json", server.unix_uri.as_deref().unwrap()]);
    let list: Value = serde_json::from_str(&text).unwrap();
    list["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn a_reflink_snapshot_reads_as_the_export_did_while_writes_go_on() {
    let Some(xfs) = Xfs::new() else { return };
    if !(require("nbdcopy") && require("nbdinfo") && require("qemu-io")) {
        return;
    }
    let image = xfs.mount.join("disk.img");
    std::fs::write(&image, vec![A; FILLED as usize]).unwrap();
    std::fs::File::options().write(true).open(&image).unwrap().set_len(SIZE).unwrap();
    let control = xfs.dir.path("ctl.sock");
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
    assert_eq!(created["checkpoint"]["name"], "s1");
    let clone = PathBuf::from(created["snapshot"]["clone"].as_str().unwrap());
    assert!(clone.starts_with(&xfs.mount) && clone.exists(), "clone beside the image: {clone:?}");
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
        let copy = xfs.dir.path(&format!("copy{round}"));
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
    let now = xfs.dir.path("live");
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
    let clone2 = PathBuf::from(s2["snapshot"]["clone"].as_str().unwrap());
    assert!(clone2.exists());
    let mut server = server;
    assert_eq!(server.stop(), Some(0));
    assert!(!clone2.exists(), "snapshots last as long as the server");

    // After kill -9 the clone stays behind until the image is served again.
    let args = ["--track", "--control", control.to_str().unwrap(), &format!("disk={}", image.display())];
    let mut server = Server::start(&args);
    let s3 = ctl_ok(&control, &["snapshot", "create", "disk", "s3"]);
    let clone3 = PathBuf::from(s3["snapshot"]["clone"].as_str().unwrap());
    server.kill9();
    assert!(clone3.exists());
    let server = Server::start(&args);
    assert!(!clone3.exists(), "a crashed run's clone is removed at start");
    assert!(!exports_listed(&server).contains(&"disk@s3".to_owned()));
}

#[test]
fn snapshots_that_cannot_be_taken_are_refused_and_leave_nothing() {
    // /tmp is ext4 on the test machines: it cannot clone.
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
    let fs = run_ok("stat", &["-f", "-c", "%T", dir.0.to_str().unwrap()]);
    let can_clone = matches!(fs.trim(), "xfs" | "btrfs");
    if !can_clone {
        assert_eq!(ctl_error(&control, &["snapshot", "create", "disk", "s1"]), "unsupported");
        let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(!left.iter().any(|n| n.to_string_lossy().contains("ringnbd-snapshot")), "{left:?}");
        let checkpoints = ctl_ok(&control, &["checkpoint", "list", "disk"]);
        assert!(checkpoints["checkpoints"].as_array().unwrap().is_empty(), "no checkpoint without its snapshot");
    }
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
