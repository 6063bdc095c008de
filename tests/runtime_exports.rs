//! Exports added, removed and reloaded while serving (`ctl export
//! add|remove|list`, `ctl reload`, SIGHUP), with clients running verified
//! I/O on other exports the whole time: none of them may notice.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Random writes and verifying reads against a model of its half of the
/// export (argv[3]: 0 or 1), until the stop file appears (at most 120 s);
/// then the half is read back and compared. Any error, a disconnect
/// included, exits non-zero.
const LOAD: &str = r#"
import nbd, os, random, sys, time
uri, stop, half = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(half)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size() // 2
base = half * size
model = bytearray(h.pread(size, base))
block = 65536
ops = 0
deadline = time.time() + 120
while not os.path.exists(stop) and time.time() < deadline:
    offset = rng.randrange(0, size // block) * block
    if rng.random() < 0.5:
        data = rng.randbytes(block)
        h.pwrite(data, base + offset)
        model[offset:offset + block] = data
    else:
        got = h.pread(block, base + offset)
        if got != model[offset:offset + block]:
            print("mismatch at", offset); sys.exit(3)
    ops += 1
h.flush()
if h.pread(size, base) != model:
    print("final contents differ"); sys.exit(4)
h.shutdown()
print(ops)
"#;

/// Holds a connection: writes, waits for the go file, writes and reads
/// again. Prints "ok" when both writes held, or the error of the failing
/// request.
const HOLD: &str = r#"
import nbd, os, sys, time
uri, go, offset = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(b"\xa1" * 4096, offset)
print("connected", flush=True)
deadline = time.time() + 60
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.01)
try:
    h.pwrite(b"\xa2" * 4096, offset + 4096)
    h.flush()
    got = h.pread(8192, offset)
    print("ok" if got == b"\xa1" * 4096 + b"\xa2" * 4096 else "wrong data")
except nbd.Error as e:
    print("error:", e)
"#;

struct Holder {
    child: Child,
    go: PathBuf,
}

impl Holder {
    /// Connects and waits until the first write is done.
    fn start(dir: &TempDir, uri: &str, offset: u64, tag: &str) -> Holder {
        use std::io::BufRead;
        let go = dir.path(&format!("go-{tag}"));
        let mut child = Command::new(PYTHON)
            .args(["-c", HOLD, uri, go.to_str().unwrap(), &offset.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "connected", "holder on {uri}");
        Holder { child, go }
    }

    /// Lets it finish; what it printed last.
    fn finish(mut self) -> String {
        use std::io::Read;
        std::fs::write(&self.go, b"").unwrap();
        let mut out = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(self.child.wait().unwrap().success());
        out.trim().to_owned()
    }
}

fn ctl(control: &Path, args: &[&str]) -> Value {
    let (reply, code) = ctl_reply(control, args);
    assert_eq!(reply["ok"], true, "ctl {args:?}: {reply}");
    assert_eq!(code, 0, "ctl {args:?}");
    reply["result"].clone()
}

fn ctl_error(control: &Path, args: &[&str]) -> (String, String) {
    let (reply, code) = ctl_reply(control, args);
    assert_eq!(reply["ok"], false, "ctl {args:?} should fail: {reply}");
    assert_eq!(code, 1);
    let error = &reply["error"];
    (error["kind"].as_str().unwrap().to_owned(), error["message"].as_str().unwrap().to_owned())
}

/// The exports `ctl export list` shows, as (name, state, connections).
fn listed(control: &Path) -> Vec<(String, String, u64)> {
    let result = ctl(control, &["export", "list"]);
    result["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let connections = e["connections"].as_u64().or(e["waiting_for_connections"].as_u64()).unwrap_or(0);
            (e["name"].as_str().unwrap().to_owned(), e["state"].as_str().unwrap().to_owned(), connections)
        })
        .collect()
}

fn offered(server: &Server) -> Vec<String> {
    let text = run_ok("nbdinfo", &["--list", "--json", server.uri()]);
    let list: Value = serde_json::from_str(&text).unwrap();
    list["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap().to_owned()).collect()
}

/// Waits until `done` holds (at most 20 s).
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn info(uri: &str) -> Value {
    let text = run_ok("nbdinfo", &["--json", uri]);
    let info: Value = serde_json::from_str(&text).unwrap();
    info["exports"][0].clone()
}

fn config_text(changing_extra: &str, rest: &str, dir: &TempDir) -> String {
    format!(
        r#"
[[export]]
name = "steady"
path = "{steady}"

[[export]]
name = "changing"
path = "{changing}"
{changing_extra}
{rest}
"#,
        steady = dir.path("steady.img").display(),
        changing = dir.path("changing.img").display(),
    )
}

#[test]
fn exports_come_and_go_while_clients_on_other_exports_run_verified_io() {
    if !require("nbd-python") || !require("nbdinfo") || !require("qemu-io") {
        return;
    }
    let dir = TempDir::new("runtime-exports");
    for (name, size) in [("steady.img", 16 << 20), ("changing.img", 8 << 20), ("added.img", 8 << 20)] {
        sparse_file(&dir.path(name), size);
    }
    let config = dir.path("ringnbd.toml");
    let old = "[[export]]\nname = \"old\"\nmemory = \"4M\"\n";
    std::fs::write(&config, config_text("description = \"v1\"", old, &dir)).unwrap();
    let control = dir.path("control.sock");
    let server = Server::start(&[
        "-c",
        config.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
        "--state-dir",
        dir.0.to_str().unwrap(),
    ]);

    // Verified I/O on "steady" over TCP and over the Unix socket, for the
    // whole test.
    let stop = dir.path("stop-load");
    let loads: Vec<Child> = [Transport::Tcp, Transport::Unix]
        .iter()
        .enumerate()
        .map(|(seed, &transport)| {
            let target = uri(&server, transport, "steady");
            Command::new(PYTHON)
                .args(["-c", LOAD, &target, stop.to_str().unwrap(), &seed.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // Add a tracked export with a checkpoint; it is offered at once.
    let added = ctl(
        &control,
        &["export", "add", "added", "--path", dir.path("added.img").to_str().unwrap(), "--checkpoint", "c0"],
    );
    assert_eq!((added["name"].as_str(), added["origin"].as_str()), (Some("added"), Some("control")));
    assert!(offered(&server).contains(&"added".to_owned()));
    let added_uri = server.export_uri("added");
    qemu_io(&added_uri, &["write -P 0x5a 1M 64k".to_owned()]);

    // Removed while a client is connected: no new clients, the connected
    // one finishes its work, and the file is busy until it has.
    let holder = Holder::start(&dir, &added_uri, 2 << 20, "first");
    let removed = ctl(&control, &["export", "remove", "added"]);
    assert_eq!(removed["connections"], 1);
    assert!(!offered(&server).contains(&"added".to_owned()));
    assert!(listed(&control).contains(&("added".into(), "removing".into(), 1)));
    let refused = run("nbdinfo", &[&added_uri]);
    assert!(!refused.status.success(), "a removed export takes no new client");
    let (kind, message) =
        ctl_error(&control, &["export", "add", "again", "--path", dir.path("added.img").to_str().unwrap()]);
    assert_eq!(kind, "busy", "{message}");
    assert!(message.contains("\"added\""), "{message}");
    assert_eq!(holder.finish(), "ok", "the connected client keeps working");
    eventually("the removed export to finish", || !listed(&control).iter().any(|(name, ..)| name == "added"));

    // Added again: the image was finished cleanly, so checkpoint c0 still
    // vouches for every change, the holder's included.
    ctl(&control, &["export", "add", "added", "--path", dir.path("added.img").to_str().unwrap(), "--track"]);
    let dirty = dirty_granules_of(&map(&added_uri, "qemu:dirty-bitmap:c0"), 64 << 10);
    assert_eq!(dirty.iter().copied().collect::<Vec<_>>(), vec![16, 32], "1M and 2M were written since c0");
    assert_eq!(
        &file_bytes(&dir.path("added.img"))[2 << 20..(2 << 20) + 8192],
        &[&[0xa1; 4096][..], &[0xa2; 4096]].concat()[..]
    );

    // --force closes the connection (its next request fails).
    let holder = Holder::start(&dir, &added_uri, 3 << 20, "forced");
    let removed = ctl(&control, &["export", "remove", "added", "--force"]);
    assert_eq!(removed["forced"], true);
    let outcome = holder.finish();
    assert!(outcome.starts_with("error:"), "a forced removal disconnects: {outcome}");
    eventually("the forced export to finish", || !listed(&control).iter().any(|(name, ..)| name == "added"));

    // Reload: "old" goes, "fresh" comes, "changing" gets a new description
    // (swapped at once), "steady" is left alone.
    let fresh = "[[export]]\nname = \"fresh/one:1\"\nmemory = \"2M\"\n";
    std::fs::write(&config, config_text("description = \"v2\"", fresh, &dir)).unwrap();
    let changing_uri = server.export_uri("changing");
    let holder = Holder::start(&dir, &changing_uri, 0, "changing");
    let report = ctl(&control, &["reload"]);
    assert_eq!(report["added"], serde_json::json!(["fresh/one:1"]), "{report}");
    assert_eq!(report["removed"], serde_json::json!(["old"]), "{report}");
    assert_eq!(report["changed"], serde_json::json!(["changing"]), "{report}");
    assert_eq!(report["unchanged"], serde_json::json!(["steady"]), "{report}");
    assert_eq!(info(&changing_uri)["description"], "v2");
    let mut names = offered(&server);
    names.sort();
    assert_eq!(names, vec!["changing", "fresh/one:1", "steady"]);

    // A storage change (read-only now) waits for the connected client,
    // then takes effect; SIGHUP does what `ctl reload` does.
    std::fs::write(&config, config_text("description = \"v3\"\nread-only = true", fresh, &dir)).unwrap();
    // SAFETY: kill sends a signal to the server this test started.
    unsafe { libc::kill(server.pid() as i32, libc::SIGHUP) };
    eventually("the storage change to wait", || {
        listed(&control).iter().any(|(name, state, _)| name == "changing" && state == "waiting")
    });
    assert_eq!(holder.finish(), "ok", "the old export served its client to the end");
    eventually("the read-only export to be offered", || {
        listed(&control).iter().any(|(name, state, _)| name == "changing" && state == "serving")
    });
    let now = info(&changing_uri);
    assert_eq!((now["is_read_only"].as_bool(), now["description"].as_str()), (Some(true), Some("v3")));

    // A config that does not parse changes nothing.
    std::fs::write(&config, "[[export]\nname = \n").unwrap();
    let (kind, message) = ctl_error(&control, &["reload"]);
    assert_eq!(kind, "bad-config", "{message}");
    assert!(message.contains("ringnbd.toml"), "the message names the file: {message}");
    assert_eq!(offered(&server).len(), 3);

    std::fs::write(&stop, b"").unwrap();
    for load in loads {
        let out = load.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "load on steady: {text} {}", String::from_utf8_lossy(&out.stderr));
        let ops: u64 = text.trim().parse().unwrap();
        assert!(ops > 100, "the load ran all along ({ops} operations)");
    }
    // Both load connections lasted the whole test and ended only when
    // their clients said so.
    let closes = || -> Vec<String> {
        let log = std::fs::read_to_string(&server.log).unwrap();
        log.lines().filter(|l| l.contains("on export \"steady\" disconnected")).map(String::from).collect()
    };
    eventually("both load connections to be logged closed", || closes().len() == 2);
    assert!(closes().iter().all(|l| l.contains("client sent NBD_CMD_DISC")), "{:?}", closes());
}

#[test]
fn export_requests_that_cannot_be_done_get_clear_errors_and_change_nothing() {
    if !require("nbdinfo") || !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("runtime-export-errors");
    let disk = dir.path("disk.img");
    sparse_file(&disk, 4 << 20);
    let control = dir.path("control.sock");
    let disk_spec = format!("disk={}", disk.display());
    let server = Server::start(&["--control", control.to_str().unwrap(), &disk_spec]);
    let disk_arg = disk.to_str().unwrap();

    let cases: [(&[&str], &str, &str); 7] = [
        (&["export", "remove", "nope"], "unknown-export", "\"nope\""),
        (&["export", "add", "disk", "--memory", "1M"], "duplicate", "\"disk\""),
        (&["export", "add", "x", "--memory", "1M", "--table", r#"{"colour":"red"}"#], "bad-request", "colour"),
        (&["export", "add", "x", "--path", "/nonexistent/x.img"], "io", "/nonexistent/x.img"),
        (&["export", "add", "x"], "bad-request", "give one of path, memory, layers or throwaway"),
        (&["export", "add", "x", "--memory", "1M", "--tls-only"], "bad-request", "tls-only needs TLS"),
        (&["reload"], "unsupported", "without --config"),
    ];
    for (args, kind, needle) in cases {
        let (got, message) = ctl_error(&control, args);
        assert_eq!(got, kind, "ctl {args:?}: {message}");
        assert!(message.contains(needle), "ctl {args:?}: {message:?} should mention {needle:?}");
    }
    assert_eq!(offered(&server), vec!["disk"], "nothing was added");

    // A second export of the same file shares its image: a write through
    // one is what the other reads and maps.
    ctl(&control, &["export", "add", "alias", "--path", disk_arg, "--read-only"]);
    qemu_io(&server.export_uri("disk"), &["write -P 0x33 0 64k".to_owned()]);
    let read = python(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1]); print(h.pread(4, 0).hex())",
        &[&server.export_uri("alias")],
    );
    assert_eq!(read.trim(), "33333333");
    assert!(info(&server.export_uri("alias"))["is_read_only"].as_bool().unwrap());
    // A command-line export can be removed too; the alias keeps the file.
    ctl(&control, &["export", "remove", "disk"]);
    eventually("disk to go", || listed(&control).iter().all(|(name, ..)| name != "disk"));
    let read = python(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1]); print(h.pread(4, 0).hex())",
        &[&server.export_uri("alias")],
    );
    assert_eq!(read.trim(), "33333333");
}
