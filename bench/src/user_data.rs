//! The io_uring `user_data` keyspace of a worker, owned here and nowhere else.
//!
//! Layout: bits 0..8 name the operation, bits 8..40 the worker-local
//! connection index; bits 40..64 are zero. Zero itself is never produced
//! (no operation has code 0), so a zeroed or foreign SQE shows up as
//! [`Owner::Unknown`] instead of being misrouted.
//!
//! No generation field is needed: a connection index is never reused
//! within a worker (connections live as long as the worker), and each
//! connection has at most one send and one receive in flight, so a CQE can
//! only ever belong to the operation its code names.

/// The operations a worker submits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A sendmsg carrying a batch of requests.
    Send = 1,
    /// A recv into the staging buffer or straight into a read buffer.
    Recv = 2,
}

/// Who a completion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Send(usize),
    Recv(usize),
    Unknown(u64),
}

const OP_BITS: u32 = 8;
const CONN_BITS: u32 = 32;
/// Connections a worker may index.
pub const CONNECTIONS_MAX: usize = 1 << CONN_BITS;

pub fn encode(op: Op, conn: usize) -> u64 {
    assert!(conn < CONNECTIONS_MAX, "connection index {conn} out of range");
    ((conn as u64) << OP_BITS) | op as u64
}

/// The single decoder every reaper uses.
pub fn classify(user_data: u64) -> Owner {
    let conn = (user_data >> OP_BITS) as usize;
    if user_data >> (OP_BITS + CONN_BITS) != 0 {
        return Owner::Unknown(user_data);
    }
    match user_data & ((1 << OP_BITS) - 1) {
        1 => Owner::Send(conn),
        2 => Owner::Recv(conn),
        _ => Owner::Unknown(user_data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for conn in [0, 1, 255, 256, 65_535, CONNECTIONS_MAX - 1] {
            assert_eq!(classify(encode(Op::Send, conn)), Owner::Send(conn));
            assert_eq!(classify(encode(Op::Recv, conn)), Owner::Recv(conn));
        }
    }

    #[test]
    fn zero_and_foreign_values_are_unknown() {
        assert_eq!(classify(0), Owner::Unknown(0));
        assert_eq!(classify(3), Owner::Unknown(3));
        assert_eq!(classify(u64::MAX), Owner::Unknown(u64::MAX));
        assert_eq!(classify(1 << 40 | 1), Owner::Unknown(1 << 40 | 1));
        assert_ne!(encode(Op::Send, 0), 0);
    }
}
