//! Accepting connections and negotiating with blocking I/O, before a
//! connection is handed to an io_uring worker.

pub mod accept;
pub mod access;
pub mod activation;
pub mod admission;
pub mod listener;
pub mod negotiate;
