mod common;

use common::*;

#[test]
fn default_memory_export_answers_nbdinfo_and_exits_zero_on_sigterm() {
    if !require("nbdinfo") {
        return;
    }
    let mut server = Server::start(&["memory:64M"]);
    let json = run_ok("nbdinfo", &["--json", server.uri()]);
    assert!(json.contains("\"export-size\": 67108864"), "{json}");
    let unix = run_ok("nbdinfo", &["--size", server.unix_uri.as_deref().unwrap()]);
    assert_eq!(unix.trim(), "67108864");
    assert_eq!(server.stop(), Some(0));
}
