//! How an export presents itself in negotiation: its description, the
//! transmission flags that hold whatever the client negotiates, and the
//! block-size constraints it advertises.

use crate::backend::Backend;
use crate::proto::handshake::BlockSize;
use crate::proto::wire::*;

/// The block sizes advertised. Any alignment works (unaligned requests take
/// the bounce and read-modify-write path), so the minimum is 1 and the
/// storage's real alignment is the preferred size: libnbd clients that ask
/// for block sizes then send any request their user makes instead of
/// refusing it themselves.
///
/// `strict` advertises the O_DIRECT alignment as the minimum instead, for
/// clients that want to be held to it; even then an export whose size is
/// not a multiple of it advertises 1, because clients bound by a minimum
/// cannot address an unaligned tail (libnbd refuses, qemu asserts).
pub fn block_size(backend: &Backend, payload_bytes_max: u32, strict: bool) -> BlockSize {
    let alignment = backend.alignment();
    let minimum = match alignment {
        a if strict && backend.size().is_multiple_of(u64::from(a)) => a,
        _ => 1,
    };
    BlockSize { minimum, preferred: alignment.max(4096), maximum: payload_bytes_max }
}

pub fn describe(backend: &Backend, read_only: bool) -> String {
    let access = if read_only { "read-only" } else { "read-write" };
    match backend {
        Backend::File(f) => {
            let io = if f.direct_io { "O_DIRECT" } else { "buffered" };
            format!("{} ({access}, {io})", f.path.display())
        }
        Backend::Memory(_) => format!("sparse memory ({access})"),
        Backend::Snapshot(s) => format!("copy-before-write snapshot, scratch {}", s.scratch_path.display()),
        Backend::Layered(l) => {
            let top = if l.throwaway { "a throwaway top".to_owned() } else { l.top.path.display().to_string() };
            let below: Vec<String> = l.lowers.iter().map(|lower| lower.file.path.display().to_string()).collect();
            format!("{top} over {} ({access}, layered)", below.join(" over "))
        }
    }
}

/// Flags that hold whatever the client negotiates. CAN_MULTI_CONN is safe:
/// there is no per-connection cache, and FLUSH syncs the shared inode.
pub fn transmission_flags(backend: &Backend, read_only: bool) -> u16 {
    let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if read_only {
        flags |= TF_READ_ONLY;
    } else {
        flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        if backend.fast_zero() {
            flags |= TF_SEND_FAST_ZERO;
        }
    }
    flags
}
