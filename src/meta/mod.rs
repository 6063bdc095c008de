//! Metadata contexts: where BLOCK_STATUS answers come from.
//!
//! `allocation` scans files (SEEK_DATA/SEEK_HOLE + FIEMAP), `extent_cache`
//! keeps per-file results coherent with the server's own writes. The
//! extent vocabulary they share with the backends is `proto::extent`; the
//! helper threads that run scans for the workers are `engine::lookup`.

pub mod allocation;
pub mod extent_cache;
