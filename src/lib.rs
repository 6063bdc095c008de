//! ringnbd: an NBD server on io_uring, one pinned ring per core.
//!
//! Layout: `proto` is the pure protocol; `net` accepts and negotiates;
//! `engine` runs transmission on io_uring; `backend` holds exports'
//! storage; `meta` answers metadata contexts; `track` keeps crash-safe
//! change tracking; `export` ties them into exports; `control` is the
//! control socket; `server` wires it all; `cli` is the command line.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod cli;
pub mod control;
pub mod engine;
pub mod export;
pub mod faults;
pub mod log;
pub mod meta;
pub mod net;
pub mod proto;
pub mod server;
pub mod tls;
pub mod track;
