//! ringnbd-bench against the real ringnbd server: verify runs over TCP and
//! a Unix socket, block-status maps of a memory export with known data,
//! and the failure paths (unreachable server, unknown export).
//!
//! The server binary is `target/<profile>/ringnbd`, next to the bench
//! binary; when it is missing it is built with `cargo build -p ringnbd`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_ringnbd-bench");
const MIB: u64 = 1 << 20;

/// `target/<profile>/ringnbd`, next to the bench binary. `cargo build` runs
/// once per test process (a no-op when the binary is fresh), so the tests
/// never run a stale server; if that build fails (the server is being
/// edited) an existing binary is used with a warning.
fn server_binary() -> PathBuf {
    static BUILD: Once = Once::new();
    let profile_dir = Path::new(BENCH).parent().expect("the bench binary lives in target/<profile>");
    let server = profile_dir.join("ringnbd");
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "ringnbd", "--bin", "ringnbd"]);
        if profile_dir.file_name().is_some_and(|name| name == "release") {
            build.arg("--release");
        }
        let built = build.current_dir(env!("CARGO_MANIFEST_DIR")).status().is_ok_and(|s| s.success());
        if !built {
            assert!(server.exists(), "cargo build -p ringnbd failed and there is no {}", server.display());
            eprintln!("warning: cargo build -p ringnbd failed; testing the existing {}", server.display());
        }
    });
    server
}

/// A running ringnbd on an ephemeral port and a Unix socket in a scratch
/// directory; SIGTERM on `stop`, kill on drop (if a test failed first).
struct Server {
    child: Option<Child>,
    tcp_uri: String,
    unix_uri: String,
    dir: PathBuf,
}

impl Server {
    fn start(export: &str) -> Server {
        Server::start_with(&[export])
    }

    /// With `args` (options and exports) after the listeners.
    fn start_with(args: &[&str]) -> Server {
        Server::spawn(args, Stdio::inherit())
    }

    /// As `start_with`, with the server's log written to `log`.
    fn start_logged(args: &[&str], log: &Path) -> Server {
        Server::spawn(args, Stdio::from(std::fs::File::create(log).expect("create the server log")))
    }

    fn spawn(args: &[&str], stderr: Stdio) -> Server {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ringnbd-bench-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("nbd.sock");
        let mut child = Command::new(server_binary())
            .args(["-l", "127.0.0.1:0", "-U"])
            .arg(&socket)
            .args(["--threads", "2", "--buffers", "64M"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start ringnbd");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut tcp_uri, mut unix_uri) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tcp_uri.is_none() || unix_uri.is_none() {
            assert!(Instant::now() < deadline, "ringnbd did not print its URIs");
            let Some(Ok(line)) = lines.next() else { panic!("ringnbd exited before printing its URIs") };
            if line.starts_with("nbd://") {
                tcp_uri = Some(line);
            } else if line.starts_with("nbd+unix://") {
                unix_uri = Some(line);
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child: Some(child), tcp_uri: tcp_uri.unwrap(), unix_uri: unix_uri.unwrap(), dir }
    }

    /// SIGTERM, then the exit code (the server must finish within 30 s).
    fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: signalling a child this test spawned and has not reaped.
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

fn bench(args: &[&str]) -> Output {
    Command::new(BENCH).args(args).output().expect("run ringnbd-bench")
}

/// Runs the bench, expecting success; returns stdout.
fn bench_ok(args: &[&str]) -> String {
    let out = bench(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ringnbd-bench {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The number right after `key` (e.g. `"ops":`) inside the object that
/// follows `section` (e.g. `"read":`), from the bench's own JSON.
fn number(json: &str, section: &str, key: &str) -> f64 {
    let start = json.find(section).unwrap_or_else(|| panic!("{section} not in {json}")) + section.len();
    let rest = &json[start..];
    let at = rest.find(key).unwrap_or_else(|| panic!("{key} not after {section} in {json}")) + key.len();
    let digits: String = rest[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    digits.parse().unwrap_or_else(|_| panic!("no number for {key} after {section} in {json}"))
}

fn assert_verified_randrw(json: &str) {
    assert!(number(json, "\"read\":", "\"ops\":") > 0.0, "{json}");
    assert!(number(json, "\"write\":", "\"ops\":") > 0.0, "{json}");
    assert!(number(json, "\"read\":", "\"p99\":") > 0.0, "{json}");
    assert!(json.contains("\"verify\":{\"ok\":true"), "{json}");
    assert_eq!(number(json, "\"verify\":", "\"sectors_bad\":"), 0.0, "{json}");
    assert!(number(json, "\"verify\":", "\"sectors_ok\":") > 0.0, "{json}");
}

#[test]
fn verified_randrw_over_tcp_and_unix_socket() {
    let mut server = Server::start("memory:256M");
    let common = ["--rw", "randrw", "--verify", "--size", "32M", "--runtime", "1.5", "--json", "-q"];
    let tcp = bench_ok(&[&[server.tcp_uri.as_str(), "--connections", "2", "--iodepth", "8"], &common[..]].concat());
    assert_verified_randrw(&tcp);
    assert!(tcp.contains("\"framing\":\"extended headers\""), "{tcp}");
    // Structured replies on the Unix socket, with the table output.
    let unix = bench_ok(&[&[server.unix_uri.as_str(), "--headers", "structured"], &common[..]].concat());
    assert_verified_randrw(&unix);
    assert!(unix.contains("\"framing\":\"structured replies\""), "{unix}");
    // Simple replies, open loop, 64 KiB requests: the table says it all.
    let line = "--headers simple --rw randrw --verify --bs 64k --size 16M --rate 2000 --runtime 1 --warmup 0.2";
    let table = bench_ok(&[&[server.tcp_uri.as_str()], &words(line)[..]].concat());
    assert!(table.contains("simple replies") && table.contains("open loop"), "{table}");
    assert!(table.contains("verify OK"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("read ")), "{table}");
    assert_eq!(server.stop(), Some(0), "ringnbd exits 0 on SIGTERM");
}

/// The server's test credentials (a CA and a certificate for localhost
/// and 127.0.0.1); the client trusts the same CA from the same directory.
fn test_certificates() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../src/tls/testdata").display().to_string()
}

#[test]
fn verified_runs_over_tls_with_small_and_large_requests() {
    let certs = test_certificates();
    let mut server = Server::start_with(&["--tls", "require", "--tls-certificates", &certs, "memory:256M"]);
    let port = server.tcp_uri.trim_end_matches('/').rsplit(':').next().unwrap().to_owned();
    let tcp = format!("nbds://localhost:{port}/?tls-certificates={certs}");
    let common = ["--rw", "randrw", "--verify", "--size", "64M", "--runtime", "1.5", "--json", "-q"];
    let small = bench_ok(&[&[tcp.as_str(), "--connections", "2", "--iodepth", "16"], &common[..]].concat());
    assert_verified_randrw(&small);
    // 1 MiB requests: read data is decrypted straight into its slot.
    let large = bench_ok(&[&[tcp.as_str(), "--bs", "1m", "--iodepth", "4"], &common[..]].concat());
    assert_verified_randrw(&large);
    let unix = format!("{}&tls-certificates={certs}", server.unix_uri.replacen("nbd+unix", "nbds+unix", 1));
    assert_verified_randrw(&bench_ok(&[&[unix.as_str(), "--headers", "structured"], &common[..]].concat()));
    // Plaintext to a server that requires TLS is refused, with the reason.
    let out = bench(&[server.tcp_uri.as_str(), "--runtime", "0.5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERR_TLS_REQD"), "{out:?}");
    assert_eq!(server.stop(), Some(0));
    // And TLS to a server without it: STARTTLS is refused, no downgrade.
    let mut plain = Server::start("memory:64M");
    let port = plain.tcp_uri.trim_end_matches('/').rsplit(':').next().unwrap().to_owned();
    let out = bench(&[&format!("nbds://localhost:{port}/?tls-certificates={certs}"), "--runtime", "0.5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("STARTTLS"), "{out:?}");
    assert_eq!(plain.stop(), Some(0));
}

#[test]
fn read_only_verify_prefills_and_ops_limit_the_run() {
    let mut server = Server::start("memory:64M");
    let json =
        bench_ok(&[&server.tcp_uri, "--rw", "randread", "--verify", "--size", "8M", "--ops", "5000", "--json", "-q"]);
    assert_eq!(number(&json, "\"read\":", "\"ops\":"), 5000.0, "{json}");
    assert!(json.contains("\"prefill\":true"), "{json}");
    // Every read found data this run wrote: nothing unknown, nothing bad.
    assert_eq!(number(&json, "\"verify\":", "\"sectors_unknown\":"), 0.0, "{json}");
    assert_eq!(number(&json, "\"verify\":", "\"sectors_ok\":"), 5000.0 * 8.0, "{json}");
    assert_eq!(server.stop(), Some(0));
}

/// Writes `[offset, offset + 1 MiB)` once, sequentially.
fn write_mib(uri: &str, offset: u64) {
    let offset = offset.to_string();
    bench_ok(&[uri, "--rw", "write", "--bs", "64k", "--offset", &offset, "--size", "1M", "--ops", "16", "-q"]);
}

#[test]
fn map_finds_the_written_regions() {
    let mut server = Server::start("memory:256M");
    for offset in [0, 64 * MIB, 200 * MIB] {
        write_mib(&server.tcp_uri, offset);
    }
    // data | hole | data | hole | data | hole: six extents, 3 MiB of data.
    let expect = |json: &str| {
        assert_eq!(number(json, "\"bytes\":{", "\"data\":"), (3 * MIB) as f64, "{json}");
        assert_eq!(number(json, "\"mode\":\"map\"", "\"extents\":"), 6.0, "{json}");
        let holes = number(json, "\"bytes\":{", "\"hole\":")
            + number(json, "\"bytes\":{", "\"hole+zero\":")
            + number(json, "\"bytes\":{", "\"zero\":");
        assert_eq!(holes, (253 * MIB) as f64, "{json}");
        assert!(number(json, "\"mode\":\"map\"", "\"extents_per_second\":") > 0.0, "{json}");
    };
    let extended = bench_ok(&[&server.tcp_uri, "--map", "--json", "-q"]);
    assert!(extended.contains("extended headers"), "{extended}");
    expect(&extended);
    // Compact headers, several connections, chunks that split extents:
    // the merge must still count six.
    let line = "--map --headers structured --map-chunk 7M --connections 3 --iodepth 4 --json -q";
    let compact = bench_ok(&[&[server.unix_uri.as_str()], &words(line)[..]].concat());
    assert!(compact.contains("structured replies"), "{compact}");
    expect(&compact);
    assert!(number(&compact, "\"mode\":\"map\"", "\"requests\":") >= 37.0, "{compact}");
    let table = bench_ok(&[&server.tcp_uri, "--map"]);
    assert!(table.contains("6 extents") && table.contains("extents/s"), "{table}");
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn failures_exit_non_zero_with_a_clear_message() {
    // Nothing listens on a port we just bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = bench(&[&format!("nbd://127.0.0.1:{port}/"), "--runtime", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");

    let mut server = Server::start("memory:16M");
    let unknown = format!("{}no-such-export", server.tcp_uri);
    let out = bench(&[&unknown, "--runtime", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ERR_UNKNOWN"), "{stderr}");

    let out = bench(&[&server.tcp_uri, "--bs", "1M", "--size", "512k", "--runtime", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("blocks"), "region smaller than one block");

    let out = bench(&[&server.tcp_uri, "--rw", "sideways"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    assert_eq!(server.stop(), Some(0));
}

/// A Unix socket has no incoming core, so the worker a connection starts on
/// is the server's guess (where its handshake ended), and for a client
/// pinned to one core that guess was often the other core: 4k QD1 then ran
/// at about 22k instead of 85k IOPS on the 2-vCPU test VM. The server now
/// tries the other core once and keeps the faster. With its thread pinned
/// to either core (`--cpus`), the client's connection ends on that core's
/// worker.
#[test]
fn a_unix_client_pinned_to_either_core_is_served_on_that_core() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cores >= 2, "placement needs two cores (this machine has {cores})");
    for core in ["0", "1", "0", "1"] {
        let log = std::env::temp_dir().join(format!("ringnbd-bench-placement-{}-{core}.log", std::process::id()));
        let mut server = Server::start_logged(&["-v", "--cpus", "0,1", "memory:64M"], &log);
        bench_ok(&[&server.unix_uri, "--iodepth", "1", "--runtime", "1", "--cpus", core]);
        assert_eq!(server.stop(), Some(0));
        let text = std::fs::read_to_string(&log).unwrap();
        let _ = std::fs::remove_file(&log);
        let closes: Vec<&str> = text.lines().filter(|l| l.contains("disconnected after")).collect();
        assert!(!closes.is_empty(), "no connection closed:\n{text}");
        for close in closes {
            assert!(close.contains(&format!("worker {core}:")), "client on core {core} was served elsewhere:\n{text}");
        }
    }
}
