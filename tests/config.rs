//! The config file with the real binary: per-export options that the
//! command line cannot express (names with `/`, `:` and `=`, one export
//! read-only and another not, per-export limits and allow-lists, tracking
//! with a checkpoint), combined with command-line options and exports,
//! and `--check-config`.
mod common;

use common::*;

fn write_config(dir: &TempDir, text: &str) -> String {
    let path = dir.path("ringnbd.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn per_export_options_from_the_file_combine_with_the_command_line() {
    if !require("nbd-python") || !require("nbdinfo") {
        return;
    }
    let dir = TempDir::new("config");
    let (golden, tracked) = (dir.path("golden.raw"), dir.path("tracked.raw"));
    std::fs::write(&golden, vec![7u8; 1 << 20]).unwrap();
    sparse_file(&tracked, 4 << 20);
    let config = write_config(
        &dir,
        &format!(
            r#"
[server]
threads = 1
state-dir = "{state}"

[[export]]
name = "vm/disk:1=a"
path = "{golden}"
read-only = true
track = false
description = "golden image, read-only"

[[export]]
name = "scratch"
memory = "16M"
max-connections = 1

[[export]]
name = "tracked"
path = "{tracked}"
checkpoints = ["c0"]

[[export]]
name = "private"
memory = "1M"
allow = ["addr:10.0.0.0/8"]
"#,
            state = dir.path("state").display(),
            golden = golden.display(),
            tracked = tracked.display()
        ),
    );
    std::fs::create_dir_all(dir.path("state")).unwrap();
    // --threads on the command line wins over the file's threads = 1.
    let mut server = Server::start(&["-c", &config, "--threads", "2", "extra=memory:2M"]);
    assert!(server.banner[0].contains("2 workers"), "{:?}", server.banner);
    let list = run_ok("nbdinfo", &["--list", "--json", server.uri()]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> =
        list["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    // File exports first, in order; "private" is not listed to a client its
    // allow-list refuses.
    assert_eq!(names, ["vm/disk:1=a", "scratch", "tracked", "extra"]);
    assert_eq!(list["exports"][0]["description"], "golden image, read-only");
    assert_eq!(list["exports"][0]["is_read_only"], true);
    assert_eq!(list["exports"][1]["is_read_only"], false);

    let script = r#"
import nbd, sys
def connect(name, strict=True):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_export_name(name)
    h.add_meta_context("qemu:dirty-bitmap:c0")
    h.connect_tcp("127.0.0.1", sys.argv[1])
    return h
golden = connect("vm/disk:1=a", strict=False)
assert golden.pread(4096, 0) == b"\x07" * 4096
try:
    golden.pwrite(b"x" * 512, 0)
    print("write to the read-only export succeeded")
except nbd.Error as e:
    print("read-only", e.errno)
tracked = connect("tracked")
assert tracked.can_meta_context("qemu:dirty-bitmap:c0"), "the file's checkpoint exists"
tracked.pwrite(b"t" * 65536, 1 << 20)
scratch = connect("scratch")
try:
    connect("scratch")
    print("a second scratch connection got in")
except nbd.Error as e:
    print("scratch limit")
try:
    connect("private")
    print("private let 127.0.0.1 in")
except nbd.Error as e:
    print("private refused")
for h in (golden, tracked, scratch):
    h.shutdown()
print("ok")
"#;
    let out = python(script, &[&server.port.unwrap().to_string()]);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["read-only EPERM", "scratch limit", "private refused", "ok"], "{out}");
    let map = run_ok("nbdinfo", &["--map=qemu:dirty-bitmap:c0", &server.export_uri("tracked")]);
    assert!(map.lines().any(|l| l.split_whitespace().take(3).eq(["1048576", "65536", "1"])), "{map}");
    assert!(dir.path("state").read_dir().unwrap().count() > 0, "state-dir from [server] is used");
    assert_eq!(server.stop(), Some(0));
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("refused GO") && log.contains("scratch"), "{log}");
}

#[test]
fn check_config_validates_without_serving() {
    let dir = TempDir::new("check-config");
    let image = dir.path("disk.raw");
    sparse_file(&image, 1 << 20);
    let good = write_config(&dir, &format!("[[export]]\nname = \"disk\"\npath = \"{}\"\n", image.display()));
    let out = run(&binary(), &["-c", &good, "--check-config", "more=memory:1M"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with(&format!("{good}: OK, 2 export(s)")), "{stdout}");

    let missing = dir.path("missing.toml");
    std::fs::write(&missing, "[[export]]\nname = \"gone\"\npath = \"/nonexistent/disk.raw\"\n").unwrap();
    let out = run(&binary(), &["-c", missing.to_str().unwrap(), "--check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/disk.raw: No such file or directory"), "{stderr}");

    for (text, expected) in [
        ("[server]\nthreads = 0\n", "[server] threads: must be between 1 and 1024"),
        ("[[export]]\nname = \"d\"\nmemory = \"1M\"\nmystery = 1\n", "line 4, column 1: unknown field `mystery`"),
        ("[[export]]\nname = \"d\"\nmemory = \"1M\"\ntls-only = true\n", "tls-only needs TLS"),
        ("[[export]]\nname = \"d\"\nmemory = \"1M\"\nallow = [\"host:x\"]\n", "export \"d\": allow \"host:x\""),
    ] {
        let bad = write_config(&dir, text);
        let out = run(&binary(), &["-c", &bad, "--check-config"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(expected), "{text}\nwanted {expected:?} in: {stderr}");
    }
    let out = run(&binary(), &["-c", "/nonexistent.toml", "--check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml: No such file"));
}
