//! How an export presents itself in negotiation: its description, the
//! transmission flags that hold whatever the client negotiates, and the
//! block-size constraints it advertises.

use crate::backend::Backend;
use crate::proto::handshake::BlockSize;
use crate::proto::wire::*;

/// The block sizes advertised. Clients bound by a minimum block size may
/// not address an unaligned tail (libnbd refuses, qemu asserts), so an
/// export whose size is not a multiple of the O_DIRECT alignment advertises
/// 1 and relies on the bounce/read-modify-write path instead.
pub fn block_size(backend: &Backend, payload_bytes_max: u32) -> BlockSize {
    let minimum = match backend.alignment() {
        a if backend.size().is_multiple_of(u64::from(a)) => a,
        _ => 1,
    };
    BlockSize { minimum, preferred: minimum.max(4096), maximum: payload_bytes_max }
}

pub fn describe(backend: &Backend, read_only: bool) -> String {
    let access = if read_only { "read-only" } else { "read-write" };
    match backend {
        Backend::File(f) => {
            let io = if f.direct_io { "O_DIRECT" } else { "buffered" };
            format!("{} ({access}, {io})", f.path.display())
        }
        Backend::Memory(_) => format!("sparse memory ({access})"),
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

