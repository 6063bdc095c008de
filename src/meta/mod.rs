//! Metadata contexts: where BLOCK_STATUS answers come from.
//!
//! `extent` is the shared vocabulary, `allocation` scans files
//! (SEEK_DATA/SEEK_HOLE + FIEMAP), `extent_cache` keeps per-export results
//! coherent with the server's own writes.

pub mod allocation;
pub mod extent;
pub mod extent_cache;
pub mod lookup;
