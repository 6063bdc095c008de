//! Transmission on io_uring: one [`worker::Worker`] per core.
//! See doc/architecture.md for the threads, the ring loop, and who owns
//! `user_data` and buffers.

pub mod block_status;
pub mod buffers;
pub mod conn;
pub mod handoff;
pub mod lookup;
pub mod metrics;
pub mod ops;
pub mod pipes;
pub mod request;
pub mod ring;
pub mod sparse_read;
pub mod tls_transport;
pub mod user_data;
pub mod worker;
pub mod write_path;

use thiserror::Error;

/// Worker start-up and ring failures (request errors never get here).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// io_uring setup or io_uring_enter failed.
    #[error("io_uring: {0}")]
    Ring(std::io::Error),
    /// The buffer region could not be mapped.
    #[error("buffer region: {0}")]
    Buffers(std::io::Error),
    /// The worker's lookup helper thread could not start.
    #[error("lookup helper: {0}")]
    Helper(std::io::Error),
}
