//! Service and script conventions, driven with the real binary: captive
//! mode (`--run`), socket activation (systemd-socket-activate and libnbd's
//! `connect_systemd_socket_activation`), one connection on stdin (`-s`,
//! libnbd's `connect_command`), `--pidfile`, `--exit-when-idle`, and
//! dropping root with `--user`/`--group`.
mod common;

use common::*;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The server under `timeout`, so a hang fails the test instead of the suite.
fn ringnbd(args: &[&str]) -> Command {
    let mut command = Command::new("timeout");
    command.args(["60", &binary(), "--threads", "2", "--buffers", "64M"]).args(args);
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_gives_the_command_a_private_socket_and_exits_with_its_status() {
    if !require("nbdinfo") || !require("qemu-img") {
        return;
    }
    let script = r#"nbdinfo --size "$uri" && echo "name=$exportname" && test -S "$unixsocket" && echo "socket=$unixsocket" && exit 7"#;
    let out = ringnbd(&["--run", script, "disk=memory:64M"]).output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "the command's status is the server's:\n{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("67108864\nname=disk\n"), "{stdout}");
    let socket = stdout.lines().find_map(|l| l.strip_prefix("socket=")).expect("the socket path");
    let dir = std::path::Path::new(socket).parent().unwrap();
    assert!(!dir.exists(), "the private directory {} is removed at exit", dir.display());

    // On a TCP address the command asked for, qemu's older nbd: form works
    // too, and a failing command's status comes back.
    let out = ringnbd(&["-l", "127.0.0.1:0", "--run", r#"qemu-img info "$nbd" && test -n "$port""#, "d=memory:8M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("virtual size: 8 MiB"), "{}", text(&out.stdout));
    let out = ringnbd(&["--run", "nbdinfo nbd://127.0.0.1:1/ 2>/dev/null", "memory:8M"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "nbdinfo's failure is the server's");
    let out = ringnbd(&["--run", "kill -9 $$", "memory:8M"]).output().unwrap();
    assert_eq!(out.status.code(), Some(128 + 9), "a signal is 128 + N, as a shell reports it");
}

fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn systemd_socket_activation_serves_the_passed_sockets_and_leaves_their_files() {
    if !require("systemd-socket-activate") || !require("nbdinfo") {
        return;
    }
    let dir = TempDir::new("activate");
    let (pidfile, socket, log) = (dir.path("ringnbd.pid"), dir.path("nbd.sock"), dir.path("stderr.log"));
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let probe = dir.path("env.txt");
    // The manager execs the server (no `timeout` in between: LISTEN_PID
    // must name the server), so the guard's kill reaches it.
    let manager = Command::new("systemd-socket-activate")
        .args(["-l", &tcp, "-l", socket.to_str().unwrap(), "--fdname=nbd:local"])
        .arg(binary())
        .args(["--threads", "2", "--buffers", "64M", "--pidfile", pidfile.to_str().unwrap(), "--run"])
        .arg(format!("env > {}; exec sleep 30", probe.display()))
        .arg("disk=memory:16M")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _manager = KillOnDrop(manager);
    wait_until("the manager's sockets", Duration::from_secs(10), || socket.exists());
    // The first connection starts the server, which finds both sockets.
    let uri = format!("nbd://{tcp}/disk");
    let size = run_ok("nbdinfo", &["--size", &uri]);
    assert_eq!(size.trim(), "16777216");
    let unix = format!("nbd+unix:///disk?socket={}", socket.display());
    assert_eq!(run_ok("nbdinfo", &["--size", &unix]).trim(), "16777216");
    wait_until("the pid file", Duration::from_secs(10), || pidfile.exists());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("socket activation: 2 socket(s) passed (nbd, local)"), "{logged}");
    assert!(!logged.contains("127.0.0.1:10809"), "the default port is not bound under activation: {logged}");
    wait_until("the --run command", Duration::from_secs(10), || {
        std::fs::read_to_string(&probe).is_ok_and(|t| t.contains("uri="))
    });
    let environment = std::fs::read_to_string(&probe).unwrap();
    assert!(!environment.contains("LISTEN_"), "the variables are not passed on:\n{environment}");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // SAFETY: SIGTERM to the server the manager started (same pid: it execs).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until("the server to exit", Duration::from_secs(20), || !pidfile.exists());
    assert!(socket.exists(), "an inherited socket file belongs to the manager and stays");
}

/// Kills and reaps a child when the test ends, passing or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn libnbd_starts_the_server_by_socket_activation_and_as_a_command_on_stdin() {
    if !require("nbd-python") {
        return;
    }
    let script = r#"
import nbd, sys
binary = sys.argv[1]
args = [binary, "--threads", "2", "--buffers", "64M"]
h = nbd.NBD()
h.connect_systemd_socket_activation(args + ["disk=memory:16M"])
assert h.get_size() == 16 << 20
h.pwrite(b"a" * 65536, 4096)
assert h.pread(65536, 4096) == b"a" * 65536
h.shutdown()
for round in range(2):
    h = nbd.NBD()
    h.connect_command(args + ["-s", "memory:8M"])
    assert h.get_size() == 8 << 20
    h.pwrite(bytes([round]) * 4096, 0)
    assert h.pread(4096, 0) == bytes([round]) * 4096
    h.shutdown()
print("ok")
"#;
    let started = Instant::now();
    // The activated server's banner shares the script's stdout.
    let out = python(script, &[&binary()]);
    assert_eq!(out.lines().last(), Some("ok"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_single_connection_on_stdin_ends_the_server_when_it_closes() {
    if !require("nbd-python") {
        return;
    }
    // The client end of a socket pair; the server gets the other on stdin
    // and stdout, as inetd and nbd_connect_command give it.
    let (client, server_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let stdout = server_end.try_clone().unwrap();
    let mut child = ringnbd(&["-s", "memory:8M"])
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(server_end)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(stdout)))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nothing but the NBD greeting may reach the client: the banner would
    // break the protocol.
    let mut greeting = [0u8; 18];
    (&client).read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC", "{:?}", text(&greeting));
    // A client that leaves during negotiation ends it, with status 0.
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the -s server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("left before transmission"), "{stderr}");
}

#[test]
fn exit_when_idle_waits_for_a_client_and_exits_after_the_last() {
    if !require("nbdinfo") || !require("nbd-python") {
        return;
    }
    let mut server = Server::start(&["--exit-when-idle", "memory:8M"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.is_running(), "no client yet: it keeps serving");
    // Two clients at once: the first leaving is not the last.
    let script = r#"
import nbd, sys, time
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
a.shutdown()
time.sleep(0.5)
b.pwrite(b"z" * 512, 0)
assert b.pread(512, 0) == b"z" * 512
b.shutdown()
print("ok")
"#;
    assert_eq!(python(script, &[server.uri()]).trim(), "ok");
    let status = server.wait_exit(Duration::from_secs(20)).expect("exits once idle");
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("the last client disconnected"), "{log}");
}

#[test]
fn root_is_dropped_after_binding_and_a_bad_user_is_refused() {
    if !require("nbdinfo") {
        return;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("SKIP: dropping privileges needs root");
        return;
    }
    let mut server = Server::start_with(&["--user", "nobody", "--group", "nogroup", "memory:8M"], true, false);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let ids =
        |key: &str| status.lines().find(|l| l.starts_with(key)).unwrap().split_whitespace().skip(1).collect::<Vec<_>>();
    assert_eq!(ids("Uid:"), ["65534"; 4], "{status}");
    assert_eq!(ids("Gid:"), ["65534"; 4], "{status}");
    assert_eq!(ids("Groups:"), ["65534"], "supplementary groups are dropped too");
    assert_eq!(run_ok("nbdinfo", &["--size", server.uri()]).trim(), "8388608");
    assert_eq!(server.stop(), Some(0));
    let out = ringnbd(&["-l", "127.0.0.1:0", "--user", "no-such-user-ringnbd", "memory:8M"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no such user"), "{}", text(&out.stderr));
}
