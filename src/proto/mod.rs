//! Pure NBD protocol code: bytes in, decisions and bytes out. No sockets,
//! rings, threads or clocks live below this module, which keeps it unit
//! testable and ready for fuzzing.

pub mod client;
pub mod error;
pub mod extent;
pub mod handshake;
pub mod meta;
pub mod reply;
pub mod transmission;
pub mod wire;

pub use error::{DecodeError, Failure, NbdError};

#[cfg(test)]
mod roundtrip_tests;
