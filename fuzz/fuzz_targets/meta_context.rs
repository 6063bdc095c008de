//! Meta-context option data: parsing never panics; what parses re-encodes
//! to something that parses to the same request; query matching only ever
//! picks offered contexts, each once, and SET never selects by wildcard.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringnbd::proto::meta::{QueryMode, match_queries, parse_meta_request};

fn encode(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_meta_request(data) else { return };
    let again = encode(request.export, &request.queries);
    let reparsed = parse_meta_request(&again).expect("a re-encoded request parses");
    assert_eq!(reparsed, request, "round trip");
    let available = ["base:allocation", "qemu:dirty-bitmap:mon", "qemu:dirty-bitmap:a:b", "ringnbd:era"];
    for mode in [QueryMode::List, QueryMode::Set] {
        let chosen = match_queries(mode, &request.queries, &available);
        for (i, &index) in chosen.iter().enumerate() {
            assert!(index < available.len());
            assert!(!chosen[..i].contains(&index), "chosen twice");
            let name = available[index];
            if mode == QueryMode::Set {
                assert!(request.queries.contains(&name), "SET selects by exact name only");
            } else {
                let listed = request.queries.is_empty()
                    || request.queries.iter().any(|q| *q == name || (q.ends_with(':') && name.starts_with(q)));
                assert!(listed, "LIST lists only names or prefixes asked for");
            }
        }
    }
});
