//! Fault injection for tests: storage errors, short transfers and a worker
//! panic, on request ranges chosen by the test.
//!
//! Enabled only by the `RINGNBD_TEST_FAULTS` environment variable, which the
//! server announces loudly at start; nothing else turns it on. The value is
//! a comma-separated list of rules:
//!
//! - `eio-read=START-END`, `eio-write=START-END`: reads (or writes) whose
//!   client range overlaps `[START, END)` fail with EIO;
//! - `short-read=START-END`, `short-write=START-END`: the first transfer of
//!   such a request moves half the bytes it asked for (the server must carry
//!   on from there);
//! - `panic-read=OFFSET`: a READ at exactly OFFSET panics its worker;
//! - `eio-state-sync=START-END`: the change-tracking state sync that would
//!   make the marks of a mutation overlapping `[START, END)` durable fails
//!   with EIO (as a failing state disk would).
//!
//! Without the variable every hook is one load of an empty cell.

use std::sync::OnceLock;

pub const ENV: &str = "RINGNBD_TEST_FAULTS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    EioRead,
    EioWrite,
    ShortRead,
    ShortWrite,
    PanicRead,
    EioStateSync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rule {
    kind: Kind,
    start: u64,
    end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultPlan {
    rules: Vec<Rule>,
}

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

static PLAN: OnceLock<FaultPlan> = OnceLock::new();

/// Reads the environment once at start. Returns the active plan's
/// description (for the start-up warning), or an error naming a bad rule.
pub fn install_from_env() -> Result<Option<String>, String> {
    let Ok(text) = std::env::var(ENV) else { return Ok(None) };
    let plan = parse(&text)?;
    let _ = PLAN.set(plan);
    Ok(Some(text))
}

fn parse(text: &str) -> Result<FaultPlan, String> {
    let mut rules = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || format!("{ENV}: bad rule {item:?}");
        let (name, range) = item.split_once('=').ok_or_else(bad)?;
        let kind = match name {
            "eio-read" => Kind::EioRead,
            "eio-write" => Kind::EioWrite,
            "short-read" => Kind::ShortRead,
            "short-write" => Kind::ShortWrite,
            "panic-read" => Kind::PanicRead,
            "eio-state-sync" => Kind::EioStateSync,
            _ => return Err(bad()),
        };
        let (start, end) = match (kind, range.split_once('-')) {
            (Kind::PanicRead, None) => {
                let at: u64 = range.parse().map_err(|_| bad())?;
                (at, at + 1)
            }
            (Kind::PanicRead, Some(_)) | (_, None) => return Err(bad()),
            (_, Some((a, b))) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
        };
        if start >= end {
            return Err(bad());
        }
        rules.push(Rule { kind, start, end });
    }
    Ok(FaultPlan { rules })
}

fn matching(kind: Kind, offset: u64, length: u64) -> bool {
    PLAN.get().is_some_and(|plan| {
        plan.rules.iter().any(|r| r.kind == kind && offset < r.end && offset.saturating_add(length.max(1)) > r.start)
    })
}

/// The result a transfer of the client range `[offset, offset + length)`
/// reports, after faults: `-EIO`, half of `result` on the request's first
/// transfer (`first`), or `result` itself.
pub fn transfer_result(direction: Direction, offset: u64, length: u64, first: bool, result: i32) -> i32 {
    if PLAN.get().is_none() || result < 0 {
        return result;
    }
    let (eio, short) = match direction {
        Direction::Read => (Kind::EioRead, Kind::ShortRead),
        Direction::Write => (Kind::EioWrite, Kind::ShortWrite),
    };
    if matching(eio, offset, length) {
        return -libc::EIO;
    }
    if first && result > 1 && matching(short, offset, length) {
        return result / 2;
    }
    result
}

/// Whether an inline (memory) transfer of this range fails with EIO.
pub fn fails(direction: Direction, offset: u64, length: u64) -> bool {
    transfer_result(direction, offset, length, false, 0) < 0
}

/// Whether the state sync covering a mutation of `[offset, end)` fails.
pub fn state_sync_fails(offset: u64, end: u64) -> bool {
    matching(Kind::EioStateSync, offset, end.saturating_sub(offset))
}

/// Panics (the test's way to crash a worker) for a READ at a chosen offset.
pub fn before_read(offset: u64) {
    if matching(Kind::PanicRead, offset, 1) {
        panic!("injected fault: panic-read at offset {offset}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_bad_ones_are_named() {
        let plan = parse("eio-read=0-4096, short-write=10-20,panic-read=7,eio-state-sync=0-1").unwrap();
        assert_eq!(plan.rules.len(), 4);
        assert_eq!(plan.rules[2], Rule { kind: Kind::PanicRead, start: 7, end: 8 });
        for bad in ["eio-read", "eio-read=5-5", "nope=1-2", "panic-read=1-2", "short-read=x-3"] {
            assert!(parse(bad).unwrap_err().contains(bad), "{bad}");
        }
    }
}
