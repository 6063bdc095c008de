//! Placement while serving (`--placement local`, the default): a
//! connection that streams large requests moves off its client's core to
//! another worker, and back when it turns latency-bound, without a byte
//! going wrong or the client noticing. TLS connections move the same
//! way, their sessions with them.
mod common;

use common::pki::Pki;
use common::*;

/// Streams 1 MiB writes for a while, reads them back in 4k pieces for a
/// while (latency-bound), then streams reads; every byte is checked.
const WORKLOAD: &str = r#"
import nbd, sys, time
h = nbd.NBD()
h.set_uri_allow_local_file(True)  # tls-certificates=DIR
h.connect_uri(sys.argv[1])
size = h.get_size()
blocks = [bytes([i % 251]) * (1 << 20) for i in range(16)]
end = time.time() + 1.0
n = 0
while time.time() < end:
    h.pwrite(blocks[n % 16], (n % (size >> 20)) << 20)
    n += 1
written = min(n, size >> 20)
def expected(mib):
    # the last write to each MiB wins
    last = max(k for k in range(n) if k % (size >> 20) == mib)
    return blocks[last % 16]
end = time.time() + 1.0
k = 0
while time.time() < end:
    mib = k % written
    offset = (k * 4096) % (1 << 20)
    if h.pread(4096, (mib << 20) + offset) != expected(mib)[offset:offset + 4096]:
        print("4k read mismatch"); sys.exit(3)
    k += 1
for mib in range(written):
    if h.pread(1 << 20, mib << 20) != expected(mib):
        print("1M read mismatch"); sys.exit(4)
h.shutdown()
print(n, k)
"#;

/// Runs `WORKLOAD` at `uri` and checks, in the log of `server`, that the
/// connection moved off its home as it streamed, came back once
/// latency-bound, and was never dropped.
fn streams_move_and_come_back(server: &Server, uri: &str, what: &str) {
    let out = python(WORKLOAD, &[uri]);
    let counts: Vec<u64> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert!(counts[0] > 100 && counts[1] > 100, "{what}: it streamed and then read small: {out}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    let moves: Vec<&str> = log.lines().filter(|l| l.contains(": moving ")).collect();
    assert!(moves.first().is_some_and(|l| l.contains("(it streams)")), "{what}: {log}");
    assert!(moves.iter().any(|l| l.contains("latency-bound again")), "{what}: {log}");
    let closes: Vec<&str> = log.lines().filter(|l| l.contains("disconnected after")).collect();
    assert_eq!(closes.len(), 1, "{what}: one connection, never dropped: {log}");
    assert!(closes[0].contains("client sent NBD_CMD_DISC"), "{}", closes[0]);
}

fn two_cores() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cores >= 2, "placement needs two cores to move between (this machine has {cores})");
}

#[test]
fn a_streaming_connection_moves_off_its_clients_core_and_back_when_it_turns_latency_bound() {
    if !require("nbd-python") {
        return;
    }
    two_cores();
    for transport in [Transport::Tcp, Transport::Unix] {
        let server = Server::start(&["-v", "--threads", "2", "--cpus", "0,1", "memory:64M"]);
        streams_move_and_come_back(&server, &uri(&server, transport, ""), &format!("{transport:?}"));
    }
}

/// A TLS connection moves with its session: records split across the
/// move (a partial record received on one worker, finished on the next)
/// must decrypt, and replies must stay in order.
#[test]
fn a_streaming_tls_connection_moves_with_its_session() {
    if !require("nbd-python") || !require("certtool") {
        return;
    }
    two_cores();
    let pki = Pki::new();
    let (server_dir, client_dir) = (pki.dir("server"), pki.dir("client"));
    for transport in [Transport::Tcp, Transport::Unix] {
        let server = Server::start(&[
            "-v",
            "--threads",
            "2",
            "--cpus",
            "0,1",
            "--tls",
            "require",
            "--tls-certificates",
            &server_dir,
            "memory:64M",
        ]);
        let uri = match transport {
            Transport::Tcp => format!("nbds://localhost:{}/?tls-certificates={client_dir}", server.port.unwrap()),
            Transport::Unix => format!(
                "nbds+unix:///?socket={}&tls-certificates={client_dir}",
                server.unix_socket.as_ref().unwrap().display()
            ),
        };
        streams_move_and_come_back(&server, &uri, &format!("TLS over {transport:?}"));
    }
}

/// The same with a PSK session (OpenSSL, the `psk` feature).
#[cfg(feature = "psk")]
#[test]
fn a_streaming_psk_connection_moves_with_its_session() {
    if !require("nbd-python") || !require("psktool") {
        return;
    }
    two_cores();
    let dir = TempDir::new("placement-psk");
    let keys = dir.path("keys.psk");
    run_ok("psktool", &["-u", "alice", "-p", &keys.display().to_string()]);
    let keys = keys.display().to_string();
    let server =
        Server::start(&["-v", "--threads", "2", "--cpus", "0,1", "--tls", "require", "--tls-psk", &keys, "memory:64M"]);
    let uri = format!("nbds://alice@localhost:{}/?tls-psk-file={keys}", server.port.unwrap());
    streams_move_and_come_back(&server, &uri, "PSK over TCP");
}
