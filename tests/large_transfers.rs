//! Large READs and WRITEs take their own paths (`--large-reads
//! copy|in-place|splice` and `--large-writes copy|in-place` for files in
//! memory, `--zero-copy-sends` for replies from buffers): every
//! combination moves exactly the right bytes (fio verify, nbdcopy and
//! qemu-img compare), answers sparse ranges with hole chunks, and survives
//! clients that vanish mid-transfer without leaking anything.
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

const MIB: u64 = 1 << 20;

/// A scratch directory on tmpfs (the paths under test serve files in
/// memory), removed on drop.
struct ShmDir(PathBuf);

impl ShmDir {
    fn new(tag: &str) -> ShmDir {
        let path = PathBuf::from(format!("/dev/shm/ringnbd-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        ShmDir(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--large-reads`, `--large-writes`, `--zero-copy-sends`. Copied reads
/// are the ones sent from buffers; on loopback the kernel copies
/// zero-copy sends anyway, so `auto` turns them off after the first and
/// only `on` keeps them on the zero-copy path.
const MODES: [(&str, &str, &str); 5] = [
    ("in-place", "copy", "auto"),
    ("splice", "in-place", "auto"),
    ("copy", "copy", "off"),
    ("copy", "in-place", "on"),
    ("in-place", "in-place", "auto"),
];

/// Data in 0..16 MiB and 40..48 MiB of a 64 MiB file, holes elsewhere.
fn sparse_image(path: &Path, golden: &Path) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).unwrap();
    file.set_len(64 * MIB).unwrap();
    file.write_all_at(&random_bytes((16 * MIB) as usize, 1), 0).unwrap();
    file.write_all_at(&random_bytes((8 * MIB) as usize, 2), 40 * MIB).unwrap();
    std::fs::copy(path, golden).unwrap();
}

/// fio random writes of `sizes` at QD8 over 24 MiB from `offset`, each
/// block read back and checked (crc32c).
fn fio_verify(uri: &str, offset: &str, sizes: &str) -> std::process::Output {
    run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            &format!("--bsrange={sizes}"),
            "--iodepth=8",
            "--size=24M",
            &format!("--offset={offset}"),
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
        ],
    )
}

/// The chunks of a structured read: (offset, type 1 data / 2 hole, len).
const CHUNKS: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for offset, length, flags in [(20 << 20, 1 << 20, 0), (20 << 20, 1 << 20, nbd.CMD_FLAG_DF), ((16 << 20) - 65536, 1 << 20, 0)]:
    chunks = []
    def chunk(buf, at, status, err):
        chunks.append("%d:%d:%d:%d" % (at - offset, status, len(buf), sum(buf) > 0))
        return 0
    h.pread_structured(length, offset, chunk, flags=flags)
    print(" ".join(chunks))
"#;

#[test]
fn every_large_transfer_path_moves_exactly_the_right_bytes() {
    if !require("fio") || !require("qemu-img") || !require("nbdcopy") || !require("nbd-python") {
        return;
    }
    for (reads, writes, zero_copy) in MODES {
        let what = format!("--large-reads {reads} --large-writes {writes} --zero-copy-sends {zero_copy}");
        let dir = ShmDir::new(&format!("large-{reads}-{writes}-{zero_copy}"));
        let (image, golden) = (dir.path("disk.img"), dir.path("golden.img"));
        sparse_image(&image, &golden);
        let image_arg = image.display().to_string();
        let server = Server::start(&[
            "--large-reads",
            reads,
            "--large-writes",
            writes,
            "--zero-copy-sends",
            zero_copy,
            &image_arg,
        ]);
        let (tcp, unix) = (uri(&server, Transport::Tcp, ""), uri(&server, Transport::Unix, ""));

        // Reads: the whole image, through both transports; reading its
        // holes allocates nothing (a shared mapping would fill them).
        use std::os::unix::fs::MetadataExt;
        let allocated = || std::fs::metadata(&image).unwrap().blocks();
        let before = allocated();
        for u in [&tcp, &unix] {
            let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", golden.to_str().unwrap(), u]);
            assert!(out.status.success(), "{what}: {u}: {}", String::from_utf8_lossy(&out.stdout));
            run_ok("nbdcopy", &[u, "null:"]);
        }
        assert_eq!(allocated(), before, "{what}: reads left the holes alone");
        // A range that is all hole is one hole chunk, unless DF asks for
        // data; a range across the end of the data is one data chunk.
        let chunks = python(CHUNKS, &[&tcp]);
        let lines: Vec<&str> = chunks.lines().collect();
        assert_eq!(lines[..2], ["0:2:1048576:0", "0:1:1048576:0"], "{what}");
        // Across the end of the data: data first; copied reads split off
        // the zeroes as a hole chunk, spliced ones send one data chunk.
        let parts: Vec<Vec<u64>> =
            lines[2].split(' ').map(|c| c.split(':').map(|n| n.parse().unwrap()).collect()).collect();
        assert_eq!(parts[0][..2], [0, 1], "{what}: {}", lines[2]);
        assert_eq!(parts.iter().map(|p| p[2]).sum::<u64>(), MIB, "{what}: {}", lines[2]);
        if reads == "splice" {
            assert_eq!(parts.len(), 1, "{what}: {}", lines[2]);
        }

        // Writes of 64k..1M, verified by fio on each transport in its own
        // region, then a whole new image copied in and compared.
        for (u, offset) in [(&tcp, "0"), (&unix, "32M")] {
            let out = fio_verify(u, offset, "64k-1m");
            assert!(out.status.success(), "{what}: fio on {u}: {}", String::from_utf8_lossy(&out.stdout));
        }
        let source = dir.path("source.img");
        std::fs::write(&source, random_bytes((64 * MIB) as usize, 3)).unwrap();
        run_ok("nbdcopy", &[source.to_str().unwrap(), &tcp]);
        let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", source.to_str().unwrap(), &unix]);
        assert!(out.status.success(), "{what}: after nbdcopy: {}", String::from_utf8_lossy(&out.stdout));
    }
}

/// Open sockets of the server (pipes of a worker's pool do not count).
fn sockets(server: &Server) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid())).unwrap();
    fds.flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
        .count()
}

#[test]
fn clients_that_vanish_mid_transfer_leave_nothing_behind() {
    if !require("nbd-python") {
        return;
    }
    // Copied reads with zero-copy sends on: replies whose buffers the
    // kernel still holds when their client goes.
    for (reads, zero_copy) in [("in-place", "auto"), ("splice", "auto"), ("copy", "on")] {
        let dir = ShmDir::new(&format!("vanish-{reads}"));
        let image = dir.path("disk.img");
        std::fs::write(&image, random_bytes((32 * MIB) as usize, 4)).unwrap();
        let image_arg = image.display().to_string();
        let mut server = Server::start(&[
            "--large-reads",
            reads,
            "--large-writes",
            "in-place",
            "--zero-copy-sends",
            zero_copy,
            &image_arg,
        ]);
        let addr = server.addr();
        let idle = sockets(&server);
        for round in 0..3 {
            // 64 pipelined 1 MiB reads whose replies are never read.
            let mut c = Raw::open_mode(&addr, "", Mode::Structured);
            for i in 0..64u64 {
                c.send(&request_bytes(0, CMD_READ, i, (i % 32) * MIB, MIB as u32));
            }
            std::thread::sleep(Duration::from_millis(50));
            drop(c);
            // A 1 MiB write that stops halfway through its payload.
            let mut c = Raw::open(&addr, "");
            c.send(&request_bytes(0, CMD_WRITE, 1, 8 * MIB, MIB as u32));
            c.send(&vec![0x5a; (MIB / 2) as usize]);
            std::thread::sleep(Duration::from_millis(20));
            drop(c);
            assert!(server.is_running(), "{reads}: round {round}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sockets(&server) > idle && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(sockets(&server), idle, "{reads}: connections leaked");
        // The server still serves: a full round trip of 1 MiB blocks.
        let check = python(
            "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
             data = bytes(range(256)) * 4096\nh.pwrite(data, 4 << 20)\n\
             print(h.pread(1 << 20, 4 << 20) == data)",
            &[server.uri()],
        );
        assert_eq!(check.trim(), "True", "{reads}");
        assert_eq!(server.stop(), Some(0), "{reads}: a clean shutdown");
    }
}

/// An O_DIRECT file on disk (ext4 under /tmp): its reads land in
/// registered buffers and, with `--zero-copy-sends on`, leave from them
/// zero-copy, each buffer held until the kernel's notification. Every byte
/// must arrive, holes included, while writes go on alongside; with `auto`
/// the loopback peer is found to be copied to and the connection copies.
#[test]
fn zero_copy_sends_from_o_direct_buffers_move_the_right_bytes() {
    if !require("fio") || !require("qemu-img") || !require("nbd-python") {
        return;
    }
    let dir = TempDir::new("zero-copy");
    let (image, golden) = (dir.path("disk.img"), dir.path("golden.img"));
    sparse_image(&image, &golden);
    let image_arg = image.display().to_string();
    let server = Server::start(&["--zero-copy-sends", "on", &image_arg]);
    let (tcp, unix) = (uri(&server, Transport::Tcp, ""), uri(&server, Transport::Unix, ""));
    for u in [&tcp, &unix] {
        let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", golden.to_str().unwrap(), u]);
        assert!(out.status.success(), "{u}: {}", String::from_utf8_lossy(&out.stdout));
    }
    let chunks = python(CHUNKS, &[&tcp]);
    assert!(chunks.lines().next() == Some("0:2:1048576:0"), "an all-hole read is one hole chunk: {chunks}");
    // Large reads verify what fio wrote, two jobs at once, one per transport.
    let fio = |u: &str, offset: &'static str| {
        let u = u.to_owned();
        std::thread::spawn(move || fio_verify(&u, offset, "64k-2m"))
    };
    let jobs = [fio(&tcp, "0"), fio(&unix, "32M")];
    for job in jobs {
        let out = job.join().unwrap();
        assert!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stdout));
    }
    drop(server);

    let server = Server::start(&["-v", "--zero-copy-sends", "auto", &image_arg]);
    run_ok("nbdcopy", &[server.uri(), "null:"]);
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("the kernel copies zero-copy sends to this peer"), "{log}");
}
