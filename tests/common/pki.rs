//! A test PKI made with GnuTLS's certtool: certificate authorities and
//! certificates in the directory layouts nbdkit, qemu and libnbd read.

use std::path::{Path, PathBuf};

use super::{TempDir, run};

/// A test PKI: a CA, a server certificate for localhost/127.0.0.1, and a
/// client certificate, in the directory layouts nbdkit, qemu and libnbd
/// read (`server/` for ringnbd, `client/` for clients).
pub struct Pki {
    dir: TempDir,
}

pub const CLIENT_SUBJECT: &str = "CN=client,O=Test,C=GB";

pub fn certtool(args: &[&str]) {
    let out = run("certtool", args);
    assert!(out.status.success(), "certtool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn template(path: &Path, lines: &[&str]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

impl Pki {
    /// An empty PKI in a fresh directory (make its parts with
    /// `authority` and `issue`).
    pub fn empty(tag: &str) -> Pki {
        Pki { dir: TempDir::new(tag) }
    }

    pub fn new() -> Pki {
        let pki = Pki::empty("pki");
        pki.authority("ca");
        pki.authority("other-ca");
        std::fs::create_dir_all(pki.path("server")).unwrap();
        std::fs::create_dir_all(pki.path("client")).unwrap();
        std::fs::create_dir_all(pki.path("stranger")).unwrap();
        pki.issue(
            "ca",
            "server",
            "server",
            &["cn = localhost", "dns_name = localhost", "ip_address = 127.0.0.1"],
            true,
        );
        pki.issue("ca", "client", "client", &["country = GB", "organization = Test", "cn = client"], false);
        pki.issue("other-ca", "stranger", "client", &["cn = stranger"], false);
        for dir in ["server", "client"] {
            std::fs::copy(pki.path("ca/ca-cert.pem"), pki.path(&format!("{dir}/ca-cert.pem"))).unwrap();
        }
        // The stranger trusts the right CA but holds a certificate of another.
        std::fs::copy(pki.path("ca/ca-cert.pem"), pki.path("stranger/ca-cert.pem")).unwrap();
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    pub fn dir(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    pub fn authority(&self, name: &str) {
        std::fs::create_dir_all(self.path(name)).unwrap();
        let (key, cert, info) = (
            self.dir(&format!("{name}/ca-key.pem")),
            self.dir(&format!("{name}/ca-cert.pem")),
            self.path(&format!("{name}/ca.info")),
        );
        template(&info, &[&format!("cn = {name}"), "ca", "cert_signing_key", "expiration_days = 30"]);
        certtool(&["--generate-privkey", "--sec-param", "medium", "--outfile", &key]);
        certtool(&[
            "--generate-self-signed",
            "--load-privkey",
            &key,
            "--template",
            &info.display().to_string(),
            "--outfile",
            &cert,
        ]);
    }

    /// A certificate signed by `ca` into `dir/{role}-cert.pem` and its key.
    pub fn issue(&self, ca: &str, dir: &str, role: &str, fields: &[&str], server: bool) {
        self.issue_with(ca, dir, role, fields, server, &["expiration_days = 30"]);
    }

    pub fn issue_with(&self, ca: &str, dir: &str, role: &str, fields: &[&str], server: bool, validity: &[&str]) {
        let key = self.dir(&format!("{dir}/{role}-key.pem"));
        let cert = self.dir(&format!("{dir}/{role}-cert.pem"));
        let info = self.path(&format!("{dir}/{role}.info"));
        let usage = if server { "tls_www_server" } else { "tls_www_client" };
        let mut lines: Vec<&str> = fields.to_vec();
        lines.extend([usage, "signing_key", "encryption_key"]);
        lines.extend(validity);
        template(&info, &lines);
        certtool(&["--generate-privkey", "--sec-param", "medium", "--outfile", &key]);
        certtool(&[
            "--generate-certificate",
            "--load-ca-certificate",
            &self.dir(&format!("{ca}/ca-cert.pem")),
            "--load-ca-privkey",
            &self.dir(&format!("{ca}/ca-key.pem")),
            "--load-privkey",
            &key,
            "--template",
            &info.display().to_string(),
            "--outfile",
            &cert,
        ]);
    }
}
