//! TLS with real clients: STARTTLS under `--tls require` and `on`, X.509
//! with and without client certificates, allow-lists, connection limits,
//! and clients that break TLS on purpose. Certificates are made per test
//! run with GnuTLS's certtool.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pki::*;
use common::raw::*;
use common::*;

fn tools() -> bool {
    ["certtool", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "nbd-python"].into_iter().all(require)
}

fn tls_uri(server: &Server, export: &str, client_dir: &str) -> String {
    format!("nbds://localhost:{}/{export}?tls-certificates={client_dir}", server.port.unwrap())
}

fn tls_object(client_dir: &str) -> String {
    format!("tls-creds-x509,id=tls0,endpoint=client,dir={client_dir}")
}

fn qemu_image_opts(server: &Server, export: &str) -> String {
    format!("driver=nbd,host=localhost,port={},export={export},tls-creds=tls0", server.port.unwrap())
}

/// `qemu-img compare` of `export` through the TLS credentials `object`
/// against the file `expected`: they must be identical.
fn qemu_img_compare(object: &str, server: &Server, export: &str, expected: &Path) {
    let file = format!("driver=file,filename={}", expected.display());
    let opts = qemu_image_opts(server, export);
    let compare = run_ok("qemu-img", &["compare", "--object", object, "--image-opts", &opts, &file]);
    assert!(compare.contains("identical"), "{compare}");
}

/// A libnbd script with `connect()` defined: TLS required, certificates
/// from argv[2], the URI in argv[1].
fn tls_script(body: &str) -> String {
    format!(
        r#"
import nbd, sys
def connect(meta=None):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(sys.argv[2])
    h.set_uri_allow_local_file(True)
    if meta:
        h.add_meta_context(meta)
    h.connect_uri(sys.argv[1])
    return h
{body}"#
    )
}

/// A server with X.509 credentials from `dir` under `--tls MODE`, and
/// `rest` after them.
fn tls_server(mode: &str, dir: &str, rest: &[&str]) -> Server {
    let mut args = vec!["--tls", mode, "--tls-certificates", dir];
    args.extend_from_slice(rest);
    Server::start(&args)
}

fn log_of(server: &Server) -> String {
    std::fs::read_to_string(&server.log).unwrap_or_default()
}

/// Waits (bounded) until the server log contains `needle`.
fn log_shows(server: &Server, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if log_of(server).contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn x509_require_serves_every_client_and_keeps_the_data() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let work = TempDir::new("tls-data");
    let image = work.path("disk.img");
    sparse_file(&image, 64 << 20);
    let (server_dir, client) = (pki.dir("server"), pki.dir("client"));
    let spec = format!("disk={}", image.display());
    let server = Server::start(&["-v", "--tls", "require", "--tls-certificates", &server_dir, &spec]);

    // nbdinfo over TCP and over the Unix socket.
    let info = run_ok("nbdinfo", &[&tls_uri(&server, "disk", &client)]);
    assert!(info.contains("with TLS"), "{info}");
    let socket = server.unix_socket.as_ref().unwrap().display().to_string();
    let unix = format!("nbds+unix:///disk?socket={socket}&tls-certificates={client}");
    assert!(run_ok("nbdinfo", &["--size", &unix]).trim() == (64u64 << 20).to_string());

    // nbdcopy up and back; qemu-img compare; qemu-io writes and reads.
    let source = work.path("source.img");
    let data = make_source(&source, 48 << 20, 11);
    run_ok("nbdcopy", &[&source.display().to_string(), &tls_uri(&server, "disk", &client)]);
    let back = work.path("back.img");
    run_ok("nbdcopy", &[&tls_uri(&server, "disk", &client), &back.display().to_string()]);
    assert!(file_bytes(&back)[..data.len()] == data[..], "data read back over TLS differs");
    let object = tls_object(&client);
    run_ok(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &qemu_image_opts(&server, "disk"),
            "-c",
            "write -P 0x5a 50M 3M",
            "-c",
            "read -P 0x5a 50M 3M",
        ],
    );
    let mut expected = data.clone();
    expected.resize(64 << 20, 0);
    expected[50 << 20..53 << 20].fill(0x5a);
    std::fs::write(&source, &expected).unwrap();
    qemu_img_compare(&object, &server, "disk", &source);

    // libnbd: pipelined unaligned writes and large reads through one
    // connection, with structured replies, extended headers if the
    // library has them, and base:allocation.
    let script = r#"
import random
h = connect(meta="base:allocation")
assert h.get_tls_negotiated()
rng = random.Random(5)
before = bytearray(h.pread(32 << 20, 0) + h.pread(32 << 20, 32 << 20))
for i in range(200):
    off = rng.randrange(0, (60 << 20))
    data = bytes([rng.randrange(256)]) * rng.randrange(1, 300000)
    h.pwrite(data, off)
    before[off:off + len(data)] = data
after = h.pread(32 << 20, 0) + h.pread(32 << 20, 32 << 20)
assert after == before
seen = []
h.block_status(64 << 20, 0, lambda ctx, off, ents, err: seen.append(ctx) or 0)
assert "base:allocation" in seen
h.shutdown()
print("ok")
"#;
    assert_eq!(python(&tls_script(script), &[&tls_uri(&server, "disk", &client), &client]).trim(), "ok");
    assert!(log_shows(&server, "TLSv1_3"), "{}", log_of(&server));
}

#[test]
fn fio_reads_and_writes_over_nbds() {
    if !tools() || !require("fio") {
        return;
    }
    let pki = Pki::new();
    // fio's nbd engine refuses URI parameters naming local files, so libnbd
    // finds the certificates where it looks by default: $HOME/.pki/libnbd.
    let home = TempDir::new("tls-home");
    std::fs::create_dir_all(home.path(".pki")).unwrap();
    let status = Command::new("cp")
        .args(["-r", &pki.dir("client"), &home.path(".pki/libnbd").display().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let server = tls_server("require", &pki.dir("server"), &["disk=memory:64M"]);
    let uri = format!("nbds://localhost:{}/disk", server.port.unwrap());
    let out = Command::new("fio")
        .env("HOME", home.0.as_os_str())
        .args([
            "--name=tls",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--runtime=20",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fio failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("verify: bad"), "{text}");
}

#[test]
fn client_certificates_are_verified_and_subjects_authorised() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let allow = format!("backup=dn:{CLIENT_SUBJECT}");
    let server = tls_server(
        "require",
        &pki.dir("server"),
        &[
            "--tls-verify-peer",
            "--allow",
            &allow,
            "disk=memory:8M",
            "backup=memory:8M",
            "--allow",
            "backup=addr:127.0.0.0/8",
        ],
    );
    let client = pki.dir("client");
    // The right certificate reaches both exports.
    run_ok("nbdinfo", &["--size", &tls_uri(&server, "backup", &client)]);
    run_ok("nbdinfo", &["--size", &tls_uri(&server, "disk", &client)]);
    // A certificate from another CA fails the TLS handshake itself.
    let stranger = run("nbdinfo", &["--size", &tls_uri(&server, "disk", &pki.dir("stranger"))]);
    assert!(!stranger.status.success());
    // No certificate at all: libnbd with only the CA.
    let bare = TempDir::new("tls-bare");
    std::fs::copy(pki.path("client/ca-cert.pem"), bare.path("ca-cert.pem")).unwrap();
    let anonymous = run("nbdinfo", &["--size", &tls_uri(&server, "disk", &bare.0.display().to_string())]);
    assert!(!anonymous.status.success(), "a client without a certificate must be refused under --tls-verify-peer");
    server_still_serves(&server, &client);

    // A revoked certificate (ca-crl.pem in the server's directory) is
    // refused, while another from the same CA still gets in.
    let revoking = Pki::new();
    revoking.issue("ca", "stranger", "client", &["cn = revoked"], false);
    let crl_info = revoking.path("crl.info");
    template(&crl_info, &["crl_next_update = 30", "crl_number = 1"]);
    certtool(&[
        "--generate-crl",
        "--load-ca-privkey",
        &revoking.dir("ca/ca-key.pem"),
        "--load-ca-certificate",
        &revoking.dir("ca/ca-cert.pem"),
        "--load-certificate",
        &revoking.dir("stranger/client-cert.pem"),
        "--template",
        &crl_info.display().to_string(),
        "--outfile",
        &revoking.dir("server/ca-crl.pem"),
    ]);
    let crl = tls_server("require", &revoking.dir("server"), &["--tls-verify-peer", "disk=memory:8M"]);
    run_ok("nbdinfo", &["--size", &tls_uri(&crl, "disk", &revoking.dir("client"))]);
    let revoked = run("nbdinfo", &["--size", &tls_uri(&crl, "disk", &revoking.dir("stranger"))]);
    assert!(!revoked.status.success(), "a revoked client certificate must be refused");

    // A subject not on the allow-list gets ERR_POLICY for that export only.
    let pki_other_subject = Pki::new();
    pki_other_subject.issue("ca", "client", "client", &["cn = intruder"], false);
    let other = tls_server(
        "require",
        &pki_other_subject.dir("server"),
        &["--tls-verify-peer", "--allow", "backup=dn:CN=backup-host", "disk=memory:8M", "backup=memory:8M"],
    );
    let intruder = pki_other_subject.dir("client");
    run_ok("nbdinfo", &["--size", &tls_uri(&other, "disk", &intruder)]);
    let refused = run("nbdinfo", &["--size", &tls_uri(&other, "backup", &intruder)]);
    assert!(!refused.status.success());
    assert!(log_shows(&other, "certificate \"CN=intruder\" is not on the allow-list"), "{}", log_of(&other));
}

fn server_still_serves(server: &Server, client: &str) {
    let size = run_ok("nbdinfo", &["--size", &tls_uri(server, "disk", client)]);
    assert!(size.trim().parse::<u64>().is_ok(), "{size}");
}

#[test]
fn wrong_ca_and_expired_certificates_are_refused() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    // The client trusts another CA: the server certificate does not verify.
    let wrong = TempDir::new("tls-wrong-ca");
    std::fs::copy(pki.path("other-ca/ca-cert.pem"), wrong.path("ca-cert.pem")).unwrap();
    let server = tls_server("require", &pki.dir("server"), &["disk=memory:8M"]);
    let out = run("nbdinfo", &["--size", &tls_uri(&server, "disk", &wrong.0.display().to_string())]);
    assert!(!out.status.success());
    server_still_serves(&server, &pki.dir("client"));

    // An expired server certificate.
    let expired = TempDir::new("tls-expired");
    std::fs::create_dir_all(expired.path("server")).unwrap();
    let old = Pki::empty("pki-old");
    old.authority("ca");
    std::fs::create_dir_all(old.path("server")).unwrap();
    old.issue_with(
        "ca",
        "server",
        "server",
        &["cn = localhost", "ip_address = 127.0.0.1", "dns_name = localhost"],
        true,
        &["activation_date = \"2020-01-01 00:00:00 UTC\"", "expiration_date = \"2020-02-01 00:00:00 UTC\""],
    );
    std::fs::copy(old.path("ca/ca-cert.pem"), old.path("server/ca-cert.pem")).unwrap();
    std::fs::create_dir_all(old.path("client")).unwrap();
    std::fs::copy(old.path("ca/ca-cert.pem"), old.path("client/ca-cert.pem")).unwrap();
    let stale = tls_server("require", &old.dir("server"), &["disk=memory:8M"]);
    let out = run("nbdinfo", &["--size", &tls_uri(&stale, "disk", &old.dir("client"))]);
    assert!(!out.status.success(), "an expired server certificate must not be accepted");
    drop(expired);
}

/// A raw client for the option phase, in Python because it needs ssl to
/// wrap the socket after STARTTLS.
const PY_STARTTLS: &str = r#"
import socket, ssl, struct, sys
host, port, ca, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=20)
def recv(n, sock):
    b = b""
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b
IHAVEOPT = 0x49484156454F5054
def option(sock, opt, data=b""):
    sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
def reply(sock):
    magic, opt, rtype, length = struct.unpack(">QIII", recv(20, sock))
    return rtype, recv(length, sock)
recv(18, s)
s.sendall(struct.pack(">I", 3))
results = []
option(s, 8)                      # STRUCTURED_REPLY
results.append(reply(s)[0])
option(s, 5)                      # STARTTLS
results.append(reply(s)[0])
if mode == "garbage":
    s.sendall(b"\x16\x03\x01\x00\x05hello-this-is-not-tls" * 50)
    try:
        while s.recv(4096):
            pass
        print("closed")
    except (ConnectionResetError, socket.timeout) as e:
        print("closed" if isinstance(e, ConnectionResetError) else "timeout")
    sys.exit(0)
if mode == "trickle":
    # A real ClientHello, one byte every 0.3 s: each read makes progress,
    # so only the deadline over the whole handshake stops it.
    inner = ssl.create_default_context(cafile=ca)
    inner.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    bio = inner.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        bio.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    import time
    try:
        for b in hello:
            s.sendall(bytes([b]))
            time.sleep(0.3)
        print("finished")
    except (BrokenPipeError, ConnectionResetError):
        print("closed")
    sys.exit(0)
if mode == "stall":
    s.sendall(b"\x16\x03\x01\x02\x00")    # a ClientHello header, then nothing
    try:
        data = s.recv(4096)
        print("closed" if not data else "data")
    except ConnectionResetError:
        print("closed")
    except socket.timeout:
        print("timeout")
    sys.exit(0)
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
t = ctx.wrap_socket(s, server_hostname="localhost")
meta = struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
option(t, 10, meta)               # SET_META_CONTEXT: SR was forgotten
results.append(reply(t)[0])
option(t, 5)                      # STARTTLS again
results.append(reply(t)[0])
if mode == "truncate":
    option(t, 8)
    results.append(reply(t)[0])
    go = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
    option(t, 7, go)
    while True:
        rtype, _ = reply(t)
        if rtype == 1:
            break
    # Half an application-data record, then close the TCP connection.
    raw = socket.socket(fileno=t.fileno())
    raw.sendall(b"\x17\x03\x03\x40\x00" + b"\x00" * 100)
    raw.detach()
    t.close()
    print(" ".join(str(r) for r in results))
    sys.exit(0)
print(" ".join(str(r) for r in results))
"#;

#[test]
fn state_before_starttls_is_forgotten_and_a_second_starttls_is_invalid() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let server = tls_server("on", &pki.dir("server"), &["disk=memory:8M"]);
    let port = server.port.unwrap().to_string();
    let out = python(PY_STARTTLS, &["127.0.0.1", &port, &format!("{}/ca-cert.pem", pki.dir("ca")), "fresh"]);
    let (ack, invalid) = (1u32.to_string(), ((1u32 << 31) | 3).to_string());
    assert_eq!(
        out.trim(),
        format!("{ack} {ack} {invalid} {invalid}"),
        "SR ACK, STARTTLS ACK, SET_META INVALID, STARTTLS INVALID"
    );
}

#[test]
fn plaintext_options_under_require_get_tls_reqd_and_export_name_disconnects() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let server = tls_server("require", &pki.dir("server"), &["disk=memory:8M"]);
    let mut c = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let tls_reqd = (1u32 << 31) | 5;
    for option in [OPT_LIST, OPT_STRUCTURED_REPLY, 0x0765_4321] {
        c.option(option, &[]);
        assert_eq!(c.option_reply().1, tls_reqd, "option {option}");
    }
    assert_eq!(c.info_or_go(OPT_GO, "disk").unwrap_err(), tls_reqd);
    c.option(OPT_EXPORT_NAME, b"disk");
    assert!(c.hung_up_within(Duration::from_secs(5)), "EXPORT_NAME without TLS must disconnect");
    // A plaintext client (libnbd that allows but does not require TLS) is
    // refused, and a TLS one still gets in.
    let plain = run("nbdinfo", &["--size", &server.export_uri("disk")]);
    assert!(!plain.status.success());
    server_still_serves(&server, &pki.dir("client"));
}

#[test]
fn tls_only_exports_need_tls_under_tls_on() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let server = tls_server("on", &pki.dir("server"), &["--tls-only", "secret", "open=memory:8M", "secret=memory:8M"]);
    run_ok("nbdinfo", &["--size", &server.export_uri("open")]);
    let mut c = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    assert_eq!(c.info_or_go(OPT_INFO, "secret").unwrap_err(), (1u32 << 31) | 5);
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (_, reply, data) = c.option_reply();
        if reply == REP_ACK {
            break;
        }
        names.push(String::from_utf8_lossy(&data[4..4 + be32(&data[..4]) as usize]).into_owned());
    }
    assert_eq!(names, vec!["open"], "LIST hides TLS-only exports from plaintext clients");
    run_ok("nbdinfo", &["--size", &tls_uri(&server, "secret", &pki.dir("client"))]);
}

#[test]
fn broken_tls_clients_are_dropped_without_disturbing_others() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let server = Server::start(&[
        "-v",
        "--tls",
        "require",
        "--tls-certificates",
        &pki.dir("server"),
        "--handshake-timeout",
        "2",
        "disk=memory:8M",
    ]);
    let client = pki.dir("client");
    // A long-lived TLS client runs I/O throughout.
    let steady = r#"
import time
h = connect()
deadline = time.time() + 6
i = 0
while time.time() < deadline:
    data = bytes([i % 251]) * 65536
    h.pwrite(data, (i % 64) * 65536)
    assert h.pread(65536, (i % 64) * 65536) == data
    i += 1
h.shutdown()
print("ok", i)
"#;
    let uri = tls_uri(&server, "disk", &client);
    let child = Command::new(PYTHON)
        .args(["-c", &tls_script(steady), &uri, &client])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let port = server.port.unwrap().to_string();
    let ca = format!("{}/ca-cert.pem", pki.dir("ca"));
    assert_eq!(python(PY_STARTTLS, &["127.0.0.1", &port, &ca, "garbage"]).trim(), "closed");
    // Stalling mid-handshake: dropped at the handshake deadline (2 s).
    let started = Instant::now();
    assert_eq!(python(PY_STARTTLS, &["127.0.0.1", &port, &ca, "stall"]).trim(), "closed");
    assert!(started.elapsed() < Duration::from_secs(15));
    // Trickling a ClientHello byte by byte: cut off at the deadline too,
    // not one timeout per byte.
    let started = Instant::now();
    assert_eq!(python(PY_STARTTLS, &["127.0.0.1", &port, &ca, "trickle"]).trim(), "closed");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    // A truncated record in transmission: that connection closes.
    python(PY_STARTTLS, &["127.0.0.1", &port, &ca, "truncate"]);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("ok"), "the steady client was disturbed: {text}");
    assert!(log_shows(&server, "TLS handshake"), "{}", log_of(&server));
    server_still_serves(&server, &client);
}

#[test]
fn sighup_reloads_certificates_without_dropping_connections() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let live = TempDir::new("tls-live");
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.path(&format!("server/{f}")), live.path(f)).unwrap();
    }
    let server = tls_server("require", &live.0.display().to_string(), &["disk=memory:8M"]);
    let client = pki.dir("client");
    // A connection opened with the old certificate stays usable.
    let holder = r#"
import time
h = connect()
h.pwrite(b"A" * 4096, 0)
sys.stdout.write("connected\n"); sys.stdout.flush()
sys.stdin.readline()
assert h.pread(4096, 0) == b"A" * 4096
h.shutdown()
print("ok")
"#;
    let mut child = Command::new(PYTHON)
        .args(["-c", &tls_script(holder), &tls_uri(&server, "disk", &client), &client])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    // New credentials from another CA, then SIGHUP.
    let fresh = Pki::new();
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(fresh.path(&format!("server/{f}")), live.path(f)).unwrap();
    }
    run_ok("kill", &["-HUP", &server.pid().to_string()]);
    assert!(log_shows(&server, "TLS credentials reloaded"), "{}", log_of(&server));
    assert!(!run("nbdinfo", &["--size", &tls_uri(&server, "disk", &client)]).status.success(), "old CA after reload");
    run_ok("nbdinfo", &["--size", &tls_uri(&server, "disk", &fresh.dir("client"))]);
    // A reload of a broken directory keeps the working credentials.
    std::fs::write(live.path("server-key.pem"), "not a key\n").unwrap();
    run_ok("kill", &["-HUP", &server.pid().to_string()]);
    assert!(log_shows(&server, "keeping the old TLS credentials"), "{}", log_of(&server));
    run_ok("nbdinfo", &["--size", &tls_uri(&server, "disk", &fresh.dir("client"))]);
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(
        child.wait().unwrap().success() && rest.trim() == "ok",
        "the connection from before the reload broke: {rest}"
    );
}

#[test]
fn address_rules_and_connection_limits_answer_policy() {
    if !require("nbd-python") || !require("nbdinfo") {
        return;
    }
    // An address rule that 127.0.0.1 does not match refuses TCP clients
    // with ERR_POLICY and is logged with the reason.
    let server = Server::start(&["--allow", "addr:10.0.0.0/8", "disk=memory:8M"]);
    let mut c = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    assert_eq!(c.info_or_go(OPT_GO, "disk").unwrap_err(), (1u32 << 31) | 2);
    assert!(log_shows(&server, "address 127.0.0.1 is not on the allow-list"), "{}", log_of(&server));
    drop(server);

    // Unix peers match by uid.
    let uid = run_ok("id", &["-u"]).trim().to_owned();
    let mine = format!("uid:{uid}");
    let server = Server::start(&["--allow", &mine, "disk=memory:8M"]);
    run_ok("nbdinfo", &["--size", server.unix_uri.as_ref().unwrap()]);
    assert!(!run("nbdinfo", &["--size", &server.export_uri("disk")]).status.success(), "TCP has no uid");
    drop(server);

    // Limits: 3 overall, 1 for "small", 2 per address (the one reached
    // here: every test client is 127.0.0.1).
    let server = Server::start(&[
        "--max-connections",
        "3",
        "--max-connections",
        "small=1",
        "--max-connections-per-address",
        "2",
        "disk=memory:8M",
        "small=memory:8M",
    ]);
    let first = Raw::open(&server.addr(), "small");
    let mut second = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    assert_eq!(second.info_or_go(OPT_GO, "small").unwrap_err(), (1u32 << 31) | 2, "small allows one connection");
    let disk = second.go("disk");
    assert!(disk.0 > 0);
    let mut third = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
    assert_eq!(third.info_or_go(OPT_GO, "disk").unwrap_err(), (1u32 << 31) | 2, "per-address cap of 2");
    assert!(log_shows(&server, "127.0.0.1 has its maximum of 2 connections"), "{}", log_of(&server));
    // Closing one gives its place back (the worker releases it).
    first.disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = Raw::handshake(&server.addr(), C_FIXED_NEWSTYLE | C_NO_ZEROES);
        match again.info_or_go(OPT_GO, "small") {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the slot was not given back: {e:#x}"),
        }
    }
    second.disconnect();
}

/// PSK in GnuTLS's keys.psk format, through the OpenSSL backend.
#[cfg(feature = "psk")]
mod psk {
    use super::*;

    fn psktool(file: &Path, user: &str) {
        run_ok("psktool", &["-u", user, "-p", &file.display().to_string()]);
    }

    fn psk_uri(server: &Server, user: &str, export: &str, keys: &Path) -> String {
        format!("nbds://{user}@localhost:{}/{export}?tls-psk-file={}", server.port.unwrap(), keys.display())
    }

    #[test]
    fn psk_clients_of_libnbd_and_qemu_get_in_and_wrong_keys_do_not() {
        if !tools() || !require("psktool") {
            return;
        }
        let dir = TempDir::new("psk");
        let keys = dir.path("keys.psk");
        psktool(&keys, "alice");
        psktool(&keys, "bob");
        let server = Server::start(&[
            "-v",
            "--tls",
            "require",
            "--tls-psk",
            &keys.display().to_string(),
            "--allow",
            "backup=psk:alice",
            "disk=memory:32M",
            "backup=memory:8M",
        ]);
        let info = run_ok("nbdinfo", &[&psk_uri(&server, "alice", "disk", &keys)]);
        assert!(info.contains("with TLS"), "{info}");
        // Data both ways through nbdcopy.
        let source = dir.path("source.img");
        let data = make_source(&source, 32 << 20, 3);
        run_ok("nbdcopy", &[&source.display().to_string(), &psk_uri(&server, "bob", "disk", &keys)]);
        let back = dir.path("back.img");
        run_ok("nbdcopy", &[&psk_uri(&server, "alice", "disk", &keys), &back.display().to_string()]);
        assert!(file_bytes(&back) == data, "data read back over PSK differs");
        // qemu's tls-creds-psk reads DIR/keys.psk.
        let object = format!("tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice", dir.0.display());
        qemu_img_compare(&object, &server, "disk", &source);
        // The allow-list: alice may use "backup", bob may not.
        run_ok("nbdinfo", &["--size", &psk_uri(&server, "alice", "backup", &keys)]);
        assert!(!run("nbdinfo", &["--size", &psk_uri(&server, "bob", "backup", &keys)]).status.success());
        assert!(log_shows(&server, "PSK user \"bob\" is not on the allow-list"), "{}", log_of(&server));
        // A wrong key and an unknown user fail the TLS handshake.
        let wrong = dir.path("wrong.psk");
        psktool(&wrong, "alice");
        assert!(!run("nbdinfo", &["--size", &psk_uri(&server, "alice", "disk", &wrong)]).status.success());
        let stranger = dir.path("stranger.psk");
        psktool(&stranger, "mallory");
        assert!(!run("nbdinfo", &["--size", &psk_uri(&server, "mallory", "disk", &stranger)]).status.success());
        assert!(log_shows(&server, "mallory"), "{}", log_of(&server));
        // libnbd's own PSK calls, as backup tools use them.
        let script = r#"
import nbd, sys
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_psk_file(sys.argv[2])
h.set_tls_username("bob")
h.connect_tcp("localhost", sys.argv[1])
assert h.get_tls_negotiated()
h.pwrite(b"psk" * 1000, 4096)
assert h.pread(3000, 4096) == b"psk" * 1000
h.shutdown()
print("ok")
"#;
        let port = server.port.unwrap().to_string();
        assert_eq!(python(script, &[&port, &keys.display().to_string()]).trim(), "ok");
        // And the server still serves.
        run_ok("nbdinfo", &["--size", &psk_uri(&server, "alice", "disk", &keys)]);
    }
}
