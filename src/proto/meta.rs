//! Metadata-context negotiation: parsing LIST/SET_META_CONTEXT data and
//! matching queries against the context names an export offers.
//!
//! Names are dynamic (one `qemu:dirty-bitmap:NAME` per checkpoint, for
//! instance), so this module only knows them as strings; what answers each
//! one is the server's business (`meta::context`).
//!
//! Query grammar (see doc/contexts.md): every query is `namespace:rest`.
//! On LIST, a query ending in `:` is a wildcard for every name it prefixes
//! (`qemu:`, `qemu:dirty-bitmap:`, `base:`), and an empty query list lists
//! everything. On SET only exact names select; wildcards select nothing.
//! Unknown namespaces and leaves are silently ignored, as the spec requires.

use super::error::DecodeError;
use super::wire::{Reader, STRING_BYTES_MAX};

/// Contexts one connection may select at once. BLOCK_STATUS answers one
/// chunk per selected context, and requests carry their choice as a 64-bit
/// mask; a SET choosing more is refused with ERR_TOO_BIG.
pub const SELECTED_MAX: usize = 64;

/// Which option the queries came from; they differ on wildcards and on an
/// empty query list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryMode {
    List,
    Set,
}

/// The decoded data of LIST_META_CONTEXT / SET_META_CONTEXT.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    pub export: &'a str,
    pub queries: Vec<&'a str>,
}

/// Upper bound on queries per option; the option-length cap bounds it anyway,
/// this keeps the allocation honest when a client lies about the count.
pub const QUERIES_MAX: usize = 1024;

pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest<'_>, DecodeError> {
    let mut r = Reader::new(data);
    let export = r.string32("export name")?;
    let count = r.u32("query count")? as usize;
    // Each query needs at least its 4-byte length, so a count beyond what the
    // remaining bytes could hold is a structural overrun.
    if count > r.remaining() / 4 || count > QUERIES_MAX {
        return Err(DecodeError::Short("queries"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u32("query length")? as usize;
        let raw = r.take(len, "query")?;
        // A query longer than any name, or not UTF-8, cannot match a
        // context: it is skipped, as qemu does, rather than failing the
        // whole option (its length was sound, so the framing is).
        if len > STRING_BYTES_MAX {
            continue;
        }
        if let Ok(query) = std::str::from_utf8(raw) {
            queries.push(query);
        }
    }
    r.expect_end("queries")?;
    Ok(MetaRequest { export, queries })
}

/// Positions in `available` of the contexts selected (SET) or listed (LIST)
/// by `queries`, in first-match order without duplicates.
pub fn match_queries<S: AsRef<str>>(mode: QueryMode, queries: &[&str], available: &[S]) -> Vec<usize> {
    let mut chosen: Vec<usize> = Vec::new();
    if queries.is_empty() {
        if mode == QueryMode::List {
            chosen.extend(0..available.len());
        }
        return chosen;
    }
    for query in queries {
        for (index, name) in available.iter().enumerate() {
            if query_selects(mode, query, name.as_ref()) && !chosen.contains(&index) {
                chosen.push(index);
            }
        }
    }
    chosen
}

fn query_selects(mode: QueryMode, query: &str, name: &str) -> bool {
    if !query.contains(':') {
        return false;
    }
    if query.ends_with(':') {
        return mode == QueryMode::List && name.starts_with(query);
    }
    query == name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::PutBe;

    fn encode(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = vec![];
        v.put_u32(export.len() as u32);
        v.extend_from_slice(export.as_bytes());
        v.put_u32(queries.len() as u32);
        for q in queries {
            v.put_u32(q.len() as u32);
            v.extend_from_slice(q.as_bytes());
        }
        v
    }

    const ALL: &[&str] = &[
        "base:allocation",
        "qemu:dirty-bitmap:mon",
        "qemu:dirty-bitmap:tue",
        "ringnbd:era",
        "ringnbd:checkpoint:1:mon",
    ];

    #[test]
    fn parses_export_and_queries() {
        let data = encode("disk", &["base:allocation", "qemu:"]);
        let req = parse_meta_request(&data).unwrap();
        assert_eq!(req.export, "disk");
        assert_eq!(req.queries, vec!["base:allocation", "qemu:"]);
    }

    #[test]
    fn structural_overruns_are_errors() {
        let mut data = encode("", &["base:allocation"]);
        data.pop();
        assert!(parse_meta_request(&data).is_err());
        let mut trailing = encode("", &[]);
        trailing.push(0);
        assert_eq!(parse_meta_request(&trailing), Err(DecodeError::Trailing("queries")));
        let mut lying = vec![];
        lying.put_u32(0);
        lying.put_u32(u32::MAX);
        assert!(parse_meta_request(&lying).is_err());
    }

    #[test]
    fn overlong_and_non_utf8_queries_are_skipped_not_fatal() {
        let mut data = encode("", &[]);
        data.truncate(data.len() - 4);
        data.put_u32(3);
        for query in [vec![b'x'; 5000], vec![0xff, 0xfe], b"base:allocation".to_vec()] {
            data.put_u32(query.len() as u32);
            data.extend_from_slice(&query);
        }
        assert_eq!(parse_meta_request(&data).unwrap().queries, vec!["base:allocation"]);
    }

    #[test]
    fn empty_query_list_lists_all_and_selects_nothing() {
        assert_eq!(match_queries(QueryMode::List, &[], ALL), vec![0, 1, 2, 3, 4]);
        assert!(match_queries(QueryMode::Set, &[], ALL).is_empty());
    }

    #[test]
    fn trailing_colon_wildcards_list_their_prefix_but_select_nothing() {
        assert_eq!(match_queries(QueryMode::List, &["base:"], ALL), vec![0]);
        assert_eq!(match_queries(QueryMode::List, &["qemu:"], ALL), vec![1, 2]);
        assert_eq!(match_queries(QueryMode::List, &["qemu:dirty-bitmap:"], ALL), vec![1, 2]);
        assert_eq!(match_queries(QueryMode::List, &["ringnbd:checkpoint:", "ringnbd:"], ALL), vec![4, 3]);
        assert!(match_queries(QueryMode::Set, &["base:", "qemu:", "qemu:dirty-bitmap:"], ALL).is_empty());
    }

    #[test]
    fn exact_names_select_and_unknowns_are_ignored() {
        let q = ["x-foo:bar", "base:nope", "nocolon", "qemu:dirty-bitmap:tue", "base:allocation", "base:allocation"];
        assert_eq!(match_queries(QueryMode::Set, &q, ALL), vec![2, 0]);
        assert!(match_queries(QueryMode::Set, &["qemu:dirty-bitmap:wed", "qemu:dirty-bitmap:mo"], ALL).is_empty());
        assert_eq!(match_queries(QueryMode::List, &["qemu:dirty-bitmap:mon"], ALL), vec![1]);
    }
}
