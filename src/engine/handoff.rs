//! What the engine takes in: a negotiated connection, handed from a
//! handshake thread (`net`) to the worker that will serve it.

use std::os::fd::OwnedFd;

use crate::proto::handshake::Negotiated;

/// A negotiated connection on its way to a worker.
pub struct NewConnection {
    pub socket: OwnedFd,
    pub negotiated: Negotiated,
    pub peer: String,
    /// The core the socket's packets arrive on (SO_INCOMING_CPU), if known.
    pub incoming_cpu: Option<usize>,
}
