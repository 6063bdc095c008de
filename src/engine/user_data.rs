//! The io_uring `user_data` keyspace. This module is its only owner: every
//! SQE's user_data is built by [`Token::encode`] and every CQE's is read by
//! [`Token::decode`], so submitters and the reaper cannot drift apart.
//!
//! Layout (u64): bits 0..32 slot index, bits 32..40 kind. Sentinels live at
//! the top of the u64 range and are never produced by `encode`.
//!
//! Invariant relied on instead of a generation counter: a slot (connection
//! or request) is freed only after the CQE of its last submitted operation
//! has been reaped, so a CQE can never name a reused slot.

const KIND_SHIFT: u32 = 32;
const SLOT_MASK: u64 = (1 << KIND_SHIFT) - 1;
/// Values at or above this are sentinels.
const SENTINEL_MIN: u64 = u64::MAX - 15;
const WAKE: u64 = u64::MAX;
const TICK: u64 = u64::MAX - 1;
const CANCEL: u64 = u64::MAX - 2;
const DRAIN_DEADLINE: u64 = u64::MAX - 3;
const HOUSEKEEPING: u64 = u64::MAX - 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// Receive on a connection's socket (header bytes or payload).
    Recv { conn: u32 },
    /// Send of a connection's queued replies.
    Send { conn: u32 },
    /// Backend I/O of one request.
    Request { request: u32 },
    /// A poll for room in a connection's socket, while a spliced read's
    /// pipe waits to be sent.
    Writable { conn: u32 },
    /// A zero-copy send of `request`'s reply data: its result, then (with
    /// IORING_CQE_F_NOTIF) the kernel's word that the buffer is free.
    SendZc { request: u32 },
    /// The fdatasync of an image's change-tracking state file that makes
    /// the marks of waiting mutations durable; `sequence` (wrapping) tells
    /// a worker's syncs of one image apart.
    Commit { image: u16, sequence: u16 },
    /// The worker's eventfd read: new connections or shutdown.
    Wake,
    /// A timeout used to retry deferred work.
    Tick,
    /// Completion of an async-cancel itself (ignored).
    Cancel,
    /// The shutdown drain ran out of time.
    DrainDeadline,
    /// The once-a-second timer: stall timeouts, idle buffer release.
    Housekeeping,
}

const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
const KIND_REQUEST: u64 = 3;
const KIND_COMMIT: u64 = 4;
const KIND_WRITABLE: u64 = 5;
const KIND_SEND_ZC: u64 = 6;

impl Token {
    pub fn encode(self) -> u64 {
        let pack = |kind: u64, slot: u32| (kind << KIND_SHIFT) | u64::from(slot);
        match self {
            Token::Recv { conn } => pack(KIND_RECV, conn),
            Token::Send { conn } => pack(KIND_SEND, conn),
            Token::Request { request } => pack(KIND_REQUEST, request),
            Token::Writable { conn } => pack(KIND_WRITABLE, conn),
            Token::SendZc { request } => pack(KIND_SEND_ZC, request),
            Token::Commit { image, sequence } => pack(KIND_COMMIT, u32::from(image) << 16 | u32::from(sequence)),
            Token::Wake => WAKE,
            Token::Tick => TICK,
            Token::Cancel => CANCEL,
            Token::DrainDeadline => DRAIN_DEADLINE,
            Token::Housekeeping => HOUSEKEEPING,
        }
    }

    /// Panics on a value `encode` cannot produce: that would be a kernel or
    /// memory-safety bug, never client input.
    pub fn decode(user_data: u64) -> Token {
        if user_data >= SENTINEL_MIN {
            return match user_data {
                WAKE => Token::Wake,
                TICK => Token::Tick,
                CANCEL => Token::Cancel,
                DRAIN_DEADLINE => Token::DrainDeadline,
                HOUSEKEEPING => Token::Housekeeping,
                _ => panic!("unknown sentinel user_data {user_data:#x}"),
            };
        }
        let slot = (user_data & SLOT_MASK) as u32;
        match user_data >> KIND_SHIFT {
            KIND_RECV => Token::Recv { conn: slot },
            KIND_SEND => Token::Send { conn: slot },
            KIND_REQUEST => Token::Request { request: slot },
            KIND_WRITABLE => Token::Writable { conn: slot },
            KIND_SEND_ZC => Token::SendZc { request: slot },
            KIND_COMMIT => Token::Commit { image: (slot >> 16) as u16, sequence: slot as u16 },
            kind => panic!("unknown user_data kind {kind} in {user_data:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind_including_extreme_slots() {
        for slot in [0, 1, 12345, u32::MAX] {
            let tokens = [
                Token::Recv { conn: slot },
                Token::Send { conn: slot },
                Token::Request { request: slot },
                Token::Writable { conn: slot },
                Token::SendZc { request: slot },
                Token::Commit { image: (slot >> 16) as u16, sequence: slot as u16 },
            ];
            for token in tokens {
                assert_eq!(Token::decode(token.encode()), token);
                assert!(token.encode() < SENTINEL_MIN);
            }
        }
        for token in [Token::Wake, Token::Tick, Token::Cancel, Token::DrainDeadline, Token::Housekeeping] {
            assert_eq!(Token::decode(token.encode()), token);
        }
    }

    #[test]
    #[should_panic(expected = "unknown user_data kind")]
    fn zero_is_not_a_valid_token() {
        Token::decode(0);
    }
}
