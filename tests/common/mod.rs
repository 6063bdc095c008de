//! Shared harness for integration tests: starts the real `ringnbd` binary,
//! finds its URIs from the banner, and stops it (SIGTERM, then wait) when
//! dropped. Tools the tests need are checked with [`require`]: under
//! `CI=true` a missing tool fails the test instead of skipping it.
#![allow(dead_code)]

pub mod pki;
pub mod raw;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Debian's python3-libnbd lives in the system interpreter only.
pub const PYTHON: &str = "/usr/bin/python3";

/// Returns false (skip) when `tool` is missing, unless CI=true, where it panics.
pub fn require(tool: &str) -> bool {
    let found = if tool == "nbd-python" {
        Command::new(PYTHON).args(["-c", "import nbd"]).output().is_ok_and(|o| o.status.success())
    } else {
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
    };
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("required test tool {tool:?} is missing (run tests/run to install it)");
        }
        eprintln!("SKIP: {tool} not installed");
    }
    found
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ringnbd-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1, for a listener the test names itself
/// (free when this returns, so the server should bind it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// The binary under test: the one cargo built, or `RINGNBD_BIN` (used to
/// show that a regression test fails against an older build).
pub fn binary() -> String {
    std::env::var("RINGNBD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ringnbd").to_owned())
}

/// How to start a server: arguments after the harness's own, and extras.
#[derive(Default)]
pub struct Launch<'a> {
    pub args: &'a [&'a str],
    pub tcp: bool,
    pub unix: bool,
    pub env: Vec<(&'a str, &'a str)>,
    /// A command the binary runs under, e.g. `["prlimit", "--nofile=256"]`.
    pub wrapper: Vec<&'a str>,
    /// Where stderr goes (inherited when None).
    pub stderr: Option<PathBuf>,
    /// No harness defaults (`--threads 2 --buffers 64M`): the server's own.
    pub bare: bool,
}

impl<'a> Launch<'a> {
    /// TCP and Unix listeners with `args`.
    pub fn new(args: &'a [&'a str]) -> Self {
        Launch { args, tcp: true, unix: true, ..Launch::default() }
    }
}

pub struct Server {
    child: Option<Child>,
    /// `nbd://127.0.0.1:PORT/` when listening on TCP.
    pub tcp_uri: Option<String>,
    /// `nbd+unix:///?socket=PATH` when listening on a Unix socket.
    pub unix_uri: Option<String>,
    /// Every TCP URI the banner printed (one per listening address).
    pub uris: Vec<String>,
    /// The banner lines up to the URIs.
    pub banner: Vec<String>,
    pub unix_socket: Option<PathBuf>,
    pub port: Option<u16>,
    /// The server's stderr.
    pub log: PathBuf,
    _dir: TempDir,
}

impl Server {
    /// Starts ringnbd on an ephemeral 127.0.0.1 port and a Unix socket,
    /// with `args` appended (exports and options).
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(args, true, true)
    }

    pub fn start_with(args: &[&str], tcp: bool, unix: bool) -> Server {
        Self::launch(&Launch { args, tcp, unix, ..Launch::default() })
    }

    /// Starts the server as `launch` describes (environment, a wrapper
    /// command such as `prlimit`, stderr capture).
    pub fn launch(launch: &Launch) -> Server {
        let (tcp, unix) = (launch.tcp, launch.unix);
        let dir = TempDir::new("server");
        let socket = dir.path("nbd.sock");
        let mut command = match launch.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        command.envs(launch.env.iter().map(|(k, v)| (*k, *v)));
        if tcp {
            command.args(["-l", "127.0.0.1:0"]);
        }
        if unix {
            command.arg("-U").arg(&socket);
        }
        // Small, predictable defaults unless the test chose its own.
        for (option, value) in [("--threads", "2"), ("--buffers", "64M")] {
            if !launch.bare && !launch.args.contains(&option) {
                command.args([option, value]);
            }
        }
        command.args(launch.args);
        // Server chatter goes to a file (shown if the test fails), not into
        // the test output.
        let log = launch.stderr.clone().unwrap_or_else(|| dir.path("stderr.log"));
        let stderr = Stdio::from(std::fs::File::create(&log).expect("stderr capture file"));
        let mut child = command.stdout(Stdio::piped()).stderr(stderr).spawn().expect("start ringnbd");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut tcp_uri, mut unix_uri) = (None, None);
        let mut uris = Vec::new();
        let mut banner = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        // The banner ends with "connect with: ..." once every listener is up.
        while !banner.last().is_some_and(|l: &String| l.starts_with("connect with:")) {
            assert!(Instant::now() < deadline, "ringnbd did not print its URIs in time");
            let Some(Ok(line)) = lines.next() else {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("ringnbd exited before printing its URIs; stderr:\n{text}")
            };
            banner.push(line.clone());
            if line.starts_with("nbd://") {
                uris.push(line.clone());
                tcp_uri = Some(line);
            } else if line.starts_with("nbd+unix://") {
                unix_uri = Some(line);
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let port = tcp_uri.as_ref().map(|u| {
            let rest = u.trim_end_matches('/').rsplit(':').next().expect("port in URI");
            rest.parse().expect("port in URI")
        });
        let unix_socket = unix.then_some(socket);
        Server { child: Some(child), tcp_uri, unix_uri, uris, banner, unix_socket, port, log, _dir: dir }
    }

    pub fn uri(&self) -> &str {
        self.tcp_uri.as_deref().or(self.unix_uri.as_deref()).unwrap()
    }

    /// URI of a named export over TCP.
    pub fn export_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port.expect("tcp"))
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port.expect("tcp"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// True while the server process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits up to `limit` for the process to exit on its own; its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Open descriptors of the server process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    /// Threads of the server process.
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid())).map_or(0, |d| d.count())
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends SIGTERM and waits; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ringnbd did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("--- server stderr ({}), last lines ---", self.log.display());
            tail.iter().rev().for_each(|l| eprintln!("{l}"));
        }
    }
}

/// Runs a command, returning its output; panics if it cannot start.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a command and asserts success, returning stdout as a string.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-io `commands` (each a `-c` argument) against a raw `uri`, which
/// must succeed.
pub fn qemu_io(uri: &str, commands: &[String]) {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(uri);
    run_ok("qemu-io", &args);
}

/// Writes 3000 bytes at the start of every 4 KiB stripe `s` of the first
/// `stripes` with `s % writers == index`, in random order.
const PY_STRIPES: &str = r#"
import nbd, random, sys
uri, index, writers, stripes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mine = [s for s in range(stripes) if s % writers == index]
random.Random(index).shuffle(mine)
h = nbd.NBD()
h.connect_uri(uri)
data = bytes([(index + 1) * 0x11]) * 3000
for s in mine:
    h.pwrite(data, s * 4096)
h.flush()
print("ok")
"#;

/// `writers` libnbd clients at once, each writing its stripes
/// ([`PY_STRIPES`]): client `i` writes stripe `s` when `s % writers == i`,
/// with the byte [`stripe_byte`].
pub fn write_stripes(uri: &str, writers: usize, stripes: u64) {
    let children: Vec<_> = (0..writers)
        .map(|i| {
            Command::new(PYTHON)
                .args(["-c", PY_STRIPES, uri, &i.to_string(), &writers.to_string(), &stripes.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok", "a stripe writer failed");
    }
}

/// The byte [`write_stripes`] writes into stripe `s`.
pub fn stripe_byte(s: usize, writers: usize) -> u8 {
    ((s % writers) as u8 + 1) * 0x11
}

/// Runs a Python snippet with python3-libnbd; `args` become sys.argv[1:].
pub fn python(script: &str, args: &[&str]) -> String {
    let mut full = vec!["-c", script];
    full.extend_from_slice(args);
    run_ok(PYTHON, &full)
}

/// How a test reaches a server.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Tcp,
    Unix,
}

/// URI of export `name` on `server` over `transport` (empty name: default export).
pub fn uri(server: &Server, transport: Transport, name: &str) -> String {
    match transport {
        Transport::Tcp => server.export_uri(name),
        Transport::Unix => {
            format!("nbd+unix:///{name}?socket={}", server.unix_socket.as_ref().expect("unix socket").display())
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// splitmix64: a seeded generator, so every test run sees the same bytes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Random bytes, fewer than `max`.
    pub fn some_bytes(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max) as usize;
        self.bytes(len)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

pub fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A raw image of `size` bytes: random data, a sparse hole in its second
/// quarter and a run of 1 MiB of written zeros at 3/4; returns its contents.
pub fn make_source(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let mut data = random_bytes(size as usize, seed);
    data[(size / 4) as usize..(size / 2) as usize].fill(0);
    data[(3 * size / 4) as usize..(3 * size / 4 + MIB) as usize].fill(0);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&data[..(size / 4) as usize], 0).unwrap();
    f.write_all_at(&data[(size / 2) as usize..], size / 2).unwrap();
    data
}

/// `ringnbd ctl --json ARGS` against `control`: the reply and exit code.
pub fn ctl_reply(control: &Path, args: &[&str]) -> (Value, i32) {
    let mut full = vec!["ctl", "--json", "--control", control.to_str().unwrap()];
    full.extend_from_slice(args);
    let out = run(&binary(), &full);
    let text = String::from_utf8_lossy(&out.stdout);
    let reply = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("ctl {args:?}: not JSON ({e}): {text:?} {}", String::from_utf8_lossy(&out.stderr)));
    (reply, out.status.code().unwrap_or(-1))
}

/// `nbdinfo --json --map=CONTEXT`: (offset, length, status) runs.
pub fn map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let text = run_ok("nbdinfo", &["--json", &format!("--map={context}"), uri]);
    let runs: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("nbdinfo --map JSON: {e}: {text}"));
    runs.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap(), r["type"].as_u64().unwrap()))
        .collect()
}

/// The granules (of `granule` bytes) a map marks with status bit 0.
pub fn dirty_granules_of(runs: &[(u64, u64, u64)], granule: u64) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    for &(offset, length, status) in runs {
        if status & 1 != 0 {
            assert!(offset % granule == 0, "dirty run at {offset} not granule-aligned");
            out.extend(offset / granule..(offset + length).div_ceil(granule));
        }
    }
    out
}
