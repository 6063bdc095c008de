//! Metadata contexts: where BLOCK_STATUS answers come from.
//!
//! `context` is the seam: a [`context::ContextSource`] per context name,
//! which the engine asks without knowing what it is. `base_allocation`
//! answers `base:allocation` from memory page maps, the extent cache, or
//! file scans (`allocation`: SEEK_DATA/SEEK_HOLE + FIEMAP) kept coherent
//! with the server's own writes by `extent_cache`. `allocation_depth` answers `qemu:allocation-depth` of layered exports
//! from their layer maps. `changes` answers the
//! change-tracking contexts from `track`. Which names an export offers is
//! `export::catalog`.

pub mod allocation;
pub mod allocation_depth;
pub mod base_allocation;
pub mod changes;
pub mod context;
pub mod extent_cache;
