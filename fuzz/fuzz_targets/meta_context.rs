//! Meta-context option data: parsing never panics; what parses re-encodes
//! to something that parses to the same request; query matching only ever
//! picks offered contexts, each once, and SET never selects by wildcard.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringnbd::proto::meta::{ContextKind, QueryMode, match_queries, parse_meta_request};

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
    let available = ContextKind::ALL;
    for mode in [QueryMode::List, QueryMode::Set] {
        let chosen = match_queries(mode, &request.queries, &available);
        for (i, kind) in chosen.iter().enumerate() {
            assert!(available.contains(kind));
            assert!(!chosen[..i].contains(kind), "chosen twice");
            if mode == QueryMode::Set {
                assert!(request.queries.contains(&kind.name()), "SET selects by exact name only");
            }
        }
    }
});
