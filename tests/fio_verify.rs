//! fio's nbd engine (libnbd) writing with crc32c verification and reading it
//! all back, against memory and O_DIRECT file exports, over TCP and the
//! Unix socket: 4 KiB random writes at queue depth 32, mixed block sizes,
//! and several jobs (connections) at once.
mod common;

use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Backing {
    Memory,
    File,
    /// A file on /dev/shm: tmpfs files are served with inline copies.
    TmpfsFile,
}

/// Removes a /dev/shm file on drop.
struct ShmFile(std::path::PathBuf);

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Every `"key" : N` number in fio's JSON output, in order.
fn json_numbers(json: &str, key: &str) -> Vec<u64> {
    let pat = format!("\"{key}\" : ");
    json.match_indices(&pat)
        .map(|(at, _)| {
            let digits: String = json[at + pat.len()..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap_or_else(|_| panic!("bad {key} near {}", &json[at..at + 40]))
        })
        .collect()
}

/// Starts a server with one export `disk` (128 MiB, memory or an O_DIRECT
/// file under a TempDir), runs fio with its nbd engine and verification,
/// and asserts it wrote and verified `total` bytes without error.
fn fio_verify(transport: Transport, backing: Backing, total: u64, extra: &[&str]) {
    if !require("fio") {
        return;
    }
    let dir = TempDir::new("fio");
    let file = dir.path("disk.raw");
    // Only the tmpfs case owns a /dev/shm file: tests run in parallel in one
    // process, so a guard in every case would delete a neighbour's image.
    let mut shm = None;
    let export = match backing {
        Backing::Memory => "disk=memory:128M".to_string(),
        Backing::File => {
            sparse_file(&file, 128 * MIB);
            format!("disk={}", file.display())
        }
        Backing::TmpfsFile => {
            let path =
                std::path::PathBuf::from(format!("/dev/shm/ringnbd-fio-{}-{total}-{transport:?}", std::process::id()));
            sparse_file(&path, 128 * MIB);
            let export = format!("disk={}", path.display());
            shm = Some(ShmFile(path));
            export
        }
    };
    let mut server = Server::start(&[&export]);
    let target = uri(&server, transport, "disk");
    let mut args = vec![
        "--name=verify".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={target}"),
        "--rw=randwrite".to_string(),
        "--verify=crc32c".to_string(),
        "--verify_fatal=1".to_string(),
        "--do_verify=1".to_string(),
        "--verify_state_save=0".to_string(),
        "--iodepth=32".to_string(),
        "--output-format=json".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    // fio writes its state files into its working directory: keep them in the TempDir.
    let out = Command::new("fio").args(&args).current_dir(&dir.0).output().expect("run fio");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{stdout}\n{stderr}");
    assert!(out.status.success(), "fio {args:?} failed ({}):\n{all}", out.status);
    let lower = all.to_lowercase();
    for bad in ["verify:", "verify failed", "bad magic", "bad header", "crc32c", "fio: io_u error", "fio: pid"] {
        // "crc32c" appears in the echoed job options; only count it outside them.
        let hits = lower.matches(bad).count();
        let echoed = if bad == "crc32c" { stdout.matches("\"verify\" : \"crc32c\"").count() } else { 0 };
        assert_eq!(hits, echoed, "fio output mentions {bad:?}:\n{all}");
    }
    let errors = json_numbers(&stdout, "error");
    assert!(!errors.is_empty() && errors.iter().all(|&e| e == 0), "fio job errors {errors:?}:\n{stdout}");
    // Per job: the "read" section comes first (the verify pass), then "write".
    let io_bytes = json_numbers(&stdout, "io_bytes");
    let jobs = errors.len();
    assert!(io_bytes.len() >= 2 * jobs, "io_bytes {io_bytes:?}:\n{stdout}");
    let (mut read, mut written) = (0, 0);
    for job in 0..jobs {
        // read, write, trim, (sync) per job; take the first two.
        let base = job * (io_bytes.len() / jobs);
        read += io_bytes[base];
        written += io_bytes[base + 1];
    }
    assert_eq!(written, total, "fio wrote {written} bytes, expected {total}:\n{stdout}");
    assert_eq!(read, total, "fio verified {read} bytes, expected all {total} written:\n{stdout}");
    assert_eq!(server.stop(), Some(0));
    drop(shm);
}

#[test]
fn fio_randwrite_4k_verify_memory_tcp() {
    fio_verify(Transport::Tcp, Backing::Memory, 64 * MIB, &["--bs=4k", "--size=64m"]);
}

#[test]
fn fio_randwrite_4k_verify_memory_unix() {
    fio_verify(Transport::Unix, Backing::Memory, 64 * MIB, &["--bs=4k", "--size=64m"]);
}

#[test]
fn fio_randwrite_4k_verify_odirect_file_tcp() {
    fio_verify(Transport::Tcp, Backing::File, 64 * MIB, &["--bs=4k", "--size=64m"]);
}

#[test]
fn fio_randwrite_4k_verify_odirect_file_unix() {
    fio_verify(Transport::Unix, Backing::File, 64 * MIB, &["--bs=4k", "--size=64m"]);
}

#[test]
fn fio_randwrite_mixed_bs_verify_memory_tcp() {
    fio_verify(Transport::Tcp, Backing::Memory, 64 * MIB, &["--bsrange=4k-128k", "--size=64m"]);
}

#[test]
fn fio_randwrite_mixed_bs_verify_odirect_file_unix() {
    fio_verify(Transport::Unix, Backing::File, 64 * MIB, &["--bsrange=4k-128k", "--size=64m"]);
}

#[test]
fn fio_randwrite_mixed_bs_verify_odirect_file_tcp() {
    fio_verify(Transport::Tcp, Backing::File, 64 * MIB, &["--bsrange=512-1m", "--blockalign=512", "--size=64m"]);
}

/// Four jobs, each its own connection, on disjoint 16 MiB slices at once.
#[test]
fn fio_four_connections_verify_odirect_file_tcp() {
    fio_verify(
        Transport::Tcp,
        Backing::File,
        64 * MIB,
        &["--bsrange=4k-64k", "--size=16m", "--numjobs=4", "--offset_increment=16m"],
    );
}

#[test]
fn fio_four_connections_verify_memory_unix() {
    fio_verify(
        Transport::Unix,
        Backing::Memory,
        64 * MIB,
        &["--bs=4k", "--size=16m", "--numjobs=4", "--offset_increment=16m"],
    );
}

#[test]
fn fio_randwrite_mixed_bs_verify_tmpfs_file_tcp() {
    fio_verify(Transport::Tcp, Backing::TmpfsFile, 64 * MIB, &["--bsrange=512-256k", "--size=64m", "--runtime=20"]);
}

/// fio's default block alignment is its block size: 1000-byte requests at
/// 1000-byte offsets on an O_DIRECT export, through a libnbd client that
/// honours the server's advertised minimum block size.
#[test]
fn fio_bs_1000_verify_odirect_file_tcp() {
    fio_verify(Transport::Tcp, Backing::File, 64_000_000, &["--bs=1000", "--size=64000000"]);
}

#[test]
fn fio_bs_1000_verify_odirect_file_unix() {
    fio_verify(Transport::Unix, Backing::File, 32_000_000, &["--bs=1000", "--size=32000000", "--rw=write"]);
}
