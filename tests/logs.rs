//! The log as operators and pipelines read it: a line per connection open
//! and close with its facts, a line per refused option that matters, a
//! line per error reply under -v, and with `--log-format json` every line
//! one JSON object.
mod common;

use common::*;
use serde_json::Value;

/// Two requests (a write and a read past the end, refused), then DISC.
const CLIENT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
h.pwrite(b"a" * 4096, 0)
try:
    h.pread(512, h.get_size())
except nbd.Error:
    pass
h.shutdown()
print("ok")
"#;

fn exercise(server: &Server) {
    assert_eq!(python(CLIENT, &[&server.export_uri("disk")]).trim(), "ok");
    let missing = run("nbdinfo", &[&server.export_uri("missing")]);
    assert!(!missing.status.success());
}

#[test]
fn json_logs_are_one_object_per_line_with_the_facts_as_fields() {
    if !require("nbd-python") || !require("nbdinfo") {
        return;
    }
    let mut server = Server::start(&["--log-format", "json", "-v", "disk=memory:8M"]);
    exercise(&server);
    assert_eq!(server.stop(), Some(0));
    let text = std::fs::read_to_string(&server.log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\nlog:\n{text}")))
        .collect();
    for line in &lines {
        let time = line["time"].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
        assert!(line["event"].is_string() && line["message"].is_string(), "{line}");
    }
    let events = |name: &'static str| lines.iter().filter(move |l| l["event"] == name);
    let close = events("connection-close")
        .find(|l| l["bytes_written"] == 4096)
        .unwrap_or_else(|| panic!("no close line of the writing client:\n{text}"));
    assert_eq!(close["export"], "disk");
    assert_eq!(close["requests"], 2);
    assert_eq!(close["bytes_read"], 0);
    assert!(close["reason"].as_str().unwrap().contains("NBD_CMD_DISC"), "{close}");
    assert!(close["duration_s"].as_f64().unwrap() >= 0.0);
    assert!(close["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{close}");
    let peer = close["peer"].clone();
    let open = events("connection-open").find(|l| l["peer"] == peer).expect("its open line");
    assert_eq!((open["export"].as_str(), open["tls"].as_bool()), (Some("disk"), Some(false)));
    assert!(open["worker"].is_u64() && open["framing"].is_string(), "{open}");
    let error = events("error-reply").next().unwrap_or_else(|| panic!("no error reply line:\n{text}"));
    assert_eq!((error["command"].as_str(), error["error"].as_str()), (Some("read"), Some("EINVAL")));
    assert_eq!(error["peer"], peer);
    let refused = events("option-refused").find(|l| l["reply"] == "ERR_UNKNOWN").expect("the unknown export");
    assert!(refused["reason"].as_str().unwrap().contains("missing"), "{refused}");
    assert!(events("message").any(|l| l["message"].as_str().unwrap().contains("finishing in-flight requests")));
}

#[test]
fn text_logs_have_a_line_per_connection_and_error_replies_only_with_v() {
    if !require("nbd-python") || !require("nbdinfo") {
        return;
    }
    let mut server = Server::start(&["disk=memory:8M"]);
    exercise(&server);
    assert_eq!(server.stop(), Some(0));
    let text = std::fs::read_to_string(&server.log).unwrap();
    assert!(text.lines().all(|l| l.starts_with("ringnbd: ")), "{text}");
    assert!(text.contains("disconnected after") && text.contains("2 request(s), 0 bytes read, 4096 written"), "{text}");
    assert!(text.contains("on export \"disk\" (Structured)"), "{text}");
    assert!(text.contains("refused GO: unknown export \"missing\""), "{text}");
    assert!(!text.contains("read failed"), "error replies are logged only with -v:\n{text}");
}
