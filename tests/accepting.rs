//! The accepting threads and the export reaper, seen from outside: an idle
//! server wakes none of them, a burst of clients is served at once on TCP
//! and Unix alike, and afterwards the threads wind down to the few kept.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::raw::{self, Raw};
use common::*;

/// Context switches so far of each thread named `prefix*`, by thread id.
fn switches(server: &Server, prefix: &str) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", server.pid())) else { return out };
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim().to_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let count: u64 = status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum();
        out.insert(task.file_name().to_string_lossy().into_owned(), (name, count));
    }
    out
}

/// One short connection: handshake, a 4 KiB read, disconnect.
fn short_connection(addr: &str) {
    let mut c = Raw::open(addr, "");
    c.request(0, raw::CMD_READ, 1, 0, 4096);
    let (error, cookie) = c.simple();
    assert_eq!((error, cookie), (0, 1));
    c.recv(4096);
    c.send(&raw::request_bytes(0, raw::CMD_DISC, 2, 0, 0));
}

/// Threads that accept and negotiate (`ringnbd-accept` only waits for the
/// stop signal).
fn accepting_threads(server: &Server) -> usize {
    switches(server, "ringnbd-handsha").len()
}

/// Four kept waiting, and the permanent one, which may come back from a
/// handshake when four others already wait.
const ACCEPTING_THREADS_SETTLED_MAX: usize = 5;

/// Once its clients have gone, the server's accepting threads and its export
/// reaper sleep until something happens: nothing polls on a timer (the
/// reaper used to wake 20 times a second, and every wake-up is CPU a
/// short connection's cost is counted in).
#[test]
fn an_idle_server_does_not_wake_its_accepting_threads_or_reaper() {
    let server = Server::start_with(&["memory:16M"], true, true);
    for _ in 0..3 {
        short_connection(&server.addr());
    }
    // Let the threads settle back into their waits.
    std::thread::sleep(Duration::from_millis(300));
    let watched = |s: &Server| {
        let mut all = switches(s, "ringnbd-accept");
        all.extend(switches(s, "ringnbd-handsha"));
        all.extend(switches(s, "ringnbd-exports"));
        all
    };
    let before = watched(&server);
    assert!(before.values().any(|(name, _)| name == "ringnbd-exports"), "reaper thread present: {before:?}");
    assert!(before.values().any(|(name, _)| name == "ringnbd-accept"), "stop watcher present: {before:?}");
    assert!(before.values().any(|(name, _)| name == "ringnbd-handsha"), "accepting thread present: {before:?}");
    std::thread::sleep(Duration::from_millis(1500));
    let after = watched(&server);
    assert_eq!(before, after, "threads woke on an idle server (thread id: name, switches)");
    // And they still serve.
    short_connection(&server.addr());
}

/// 24 clients at once, over TCP and over the Unix socket, three rounds: all
/// are served, and afterwards only the kept accepting threads are left.
#[test]
fn a_burst_of_clients_is_served_and_the_threads_wind_down() {
    let server = Server::start_with(&["memory:16M"], true, true);
    let tcp = server.addr();
    let unix_uri = uri(&server, Transport::Unix, "");
    for round in 0..3 {
        let start = Instant::now();
        let clients: Vec<_> = (0..24)
            .map(|i| {
                let (tcp, unix_uri) = (tcp.clone(), unix_uri.clone());
                std::thread::spawn(move || {
                    if i % 2 == 0 {
                        short_connection(&tcp);
                    } else {
                        let out = run_ok("nbdinfo", &["--size", &unix_uri]);
                        assert_eq!(out.trim(), (16u64 << 20).to_string());
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().expect("client served");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "round {round} took {:?}", start.elapsed());
    }
    // Extra threads leave once four wait; give the last handshakes a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while accepting_threads(&server) > ACCEPTING_THREADS_SETTLED_MAX && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = accepting_threads(&server);
    assert!((1..=ACCEPTING_THREADS_SETTLED_MAX).contains(&left), "{left} accepting threads left");
    short_connection(&tcp);
}
