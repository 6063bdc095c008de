//! What a new user meets: Unix socket paths owned safely, listen addresses
//! as people write them, one name for the default export, clear errors for
//! arguments that cannot work, per-export descriptions, and a -v log that
//! says what happened to each client.

mod common;

use std::process::Command;
use std::time::Duration;

use common::raw::{self, Raw};
use common::*;

fn refused(args: &[&str]) -> String {
    let out = Command::new("timeout").arg("10").arg(binary()).args(args).output().expect("run ringnbd");
    assert_eq!(out.status.code(), Some(2), "{args:?} must be refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn unix_only<'a>(args: &'a [&'a str]) -> Launch<'a> {
    Launch { tcp: false, ..Launch::new(args) }
}

#[test]
fn a_second_server_on_a_live_unix_socket_is_refused_and_the_first_keeps_serving() {
    let dir = TempDir::new("sock-live");
    let path = dir.path("s.sock");
    let path_arg = path.display().to_string();
    let first = Server::launch(&Launch { tcp: false, unix: false, ..Launch::new(&["-U", &path_arg, "memory:1M"]) });
    let out = Command::new("timeout").arg("10").arg(binary()).args(["-U", &path_arg, "memory:1M"]).output().unwrap();
    assert!(!out.status.success(), "the second server must not start");
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("another server is listening"), "{message}");
    assert!(path.exists(), "the live server's socket is still there");
    let mut c = std::os::unix::net::UnixStream::connect(&path).expect("first server still reachable");
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut c, &mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    drop(first);
}

#[test]
fn a_stale_socket_is_replaced_and_a_foreign_one_is_never_deleted() {
    let dir = TempDir::new("sock-stale");
    let path = dir.path("s.sock");
    let path_arg = path.display().to_string();
    let args = ["-U", &path_arg, "memory:1M"];
    let launch = Launch { tcp: false, unix: false, ..Launch::new(&args) };
    let mut crashed = Server::launch(&launch);
    crashed.kill9();
    assert!(path.exists(), "kill -9 leaves the socket file behind");
    let mut second = Server::launch(&launch);
    // Someone else takes the path while the server runs.
    std::fs::remove_file(&path).unwrap();
    let theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
    assert_eq!(second.stop(), Some(0));
    assert!(path.exists(), "the server deleted a socket file it did not create");
    drop(theirs);
}

#[test]
fn listen_addresses_take_names_and_default_to_port_10809() {
    let mut server = Server::launch(&unix_only(&["-l", "localhost:0", "memory:1M"]));
    assert!(!server.uris.is_empty(), "{:?}", server.banner);
    for uri in &server.uris {
        let addr = uri.trim_start_matches("nbd://").trim_end_matches('/');
        let mut c = Raw::connect(addr);
        c.greeting();
    }
    assert_eq!(server.stop(), Some(0));
    // No port at all means the NBD port.
    let mut server = Server::launch(&unix_only(&["-l", "127.0.0.1", "memory:1M"]));
    assert_eq!(server.uris, vec!["nbd://127.0.0.1:10809/".to_string()]);
    Raw::connect("127.0.0.1:10809").greeting();
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn the_default_export_has_one_name_everywhere() {
    let mut server = Server::launch(&Launch { bare: true, ..Launch::new(&[]) });
    let line = server.banner.iter().find(|l| l.starts_with("export ")).expect("export line").clone();
    assert!(line.starts_with("export \"memory0\": 1 GiB"), "{line}");
    assert!(line.contains("the default export"), "{line}");
    if require("nbdinfo") {
        let listed = run_ok("nbdinfo", &["--list", "--json", server.uri()]);
        assert!(listed.contains("\"export-name\": \"memory0\""), "{listed}");
        let default = run_ok("nbdinfo", &["--json", server.uri()]);
        assert!(default.contains("\"export-name\": \"memory0\""), "the empty name is memory0: {default}");
    }
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn arguments_that_cannot_work_get_clear_errors() {
    for (arg, says) in [
        ("x=", "x=PATH"),
        ("memory:0", "at least one byte"),
        ("a:b=memory:1M", "cannot contain '/' or ':'"),
        ("=memory:1M", "default"),
        ("memory:12Q", "bad size"),
    ] {
        let message = refused(&[arg]);
        assert!(message.contains(says), "{arg}: {message}");
    }
}

#[test]
fn descriptions_can_be_given_per_export() {
    if !require("nbdinfo") {
        return;
    }
    let mut server =
        Server::start(&["a=memory:1M", "b=memory:1M", "--description", "b=backup target", "--description", "scratch"]);
    let listed = run_ok("nbdinfo", &["--list", "--json", server.uri()]);
    assert!(listed.contains("\"description\": \"backup target\""), "{listed}");
    assert!(listed.contains("\"description\": \"scratch\""), "{listed}");
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn verbose_logs_unknown_exports_refused_options_and_disconnect_reasons() {
    let dir = TempDir::new("verbose");
    let log = dir.path("stderr.log");
    let mut server = Server::launch(&Launch { stderr: Some(log.clone()), ..Launch::new(&["-v", "memory:1M"]) });
    let addr = server.addr();
    let mut c = Raw::handshake(&addr, raw::C_FIXED_NEWSTYLE | raw::C_NO_ZEROES);
    assert_eq!(c.info_or_go(raw::OPT_GO, "nope").unwrap_err(), raw::REP_ERR_UNKNOWN);
    c.option(raw::OPT_STRUCTURED_REPLY, &[]);
    c.option_reply();
    c.option(raw::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, raw::REP_ERR_INVALID);
    c.go("");
    c.mode = raw::Mode::Structured;
    c.disconnect();
    let mut bad = Raw::open(&addr, "");
    bad.send(&[0xffu8; 28]);
    assert!(bad.closed_within(Duration::from_secs(5)).is_some());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.stop(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    for expected in [
        "refused GO: unknown export \"nope\"",
        "refused STRUCTURED_REPLY: structured replies already negotiated",
        "client sent NBD_CMD_DISC",
        "protocol violation: bad request magic",
    ] {
        assert!(text.contains(expected), "log lacks {expected:?}:\n{text}");
    }
}
