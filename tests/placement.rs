//! Placement while serving (`--placement local`, the default): a
//! connection that streams large requests moves off its client's core to
//! another worker, and back when it turns latency-bound, without a byte
//! going wrong or the client noticing.
mod common;

use common::*;

/// Streams 1 MiB writes for a while, reads them back in 4k pieces for a
/// while (latency-bound), then streams reads; every byte is checked.
const WORKLOAD: &str = r#"
import nbd, sys, time
h = nbd.NBD()
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

#[test]
fn a_streaming_connection_moves_off_its_clients_core_and_back_when_it_turns_latency_bound() {
    if !require("nbd-python") {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cores >= 2, "placement needs two cores to move between (this machine has {cores})");
    for transport in [Transport::Tcp, Transport::Unix] {
        let server = Server::start(&["-v", "--threads", "2", "--cpus", "0,1", "memory:64M"]);
        let out = python(WORKLOAD, &[&uri(&server, transport, "")]);
        let counts: Vec<u64> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
        assert!(counts[0] > 100 && counts[1] > 100, "{transport:?}: it streamed and then read small: {out}");
        let log = std::fs::read_to_string(&server.log).unwrap();
        let moves: Vec<&str> = log.lines().filter(|l| l.contains(": moving ")).collect();
        assert!(moves.first().is_some_and(|l| l.contains("(it streams)")), "{transport:?}: {log}");
        assert!(moves.iter().any(|l| l.contains("latency-bound again")), "{transport:?}: {log}");
        let closes: Vec<&str> = log.lines().filter(|l| l.contains("disconnected after")).collect();
        assert_eq!(closes.len(), 1, "{transport:?}: one connection, never dropped: {log}");
        assert!(closes[0].contains("client sent NBD_CMD_DISC"), "{}", closes[0]);
    }
}
