//! What the engine takes in: what is on offer to negotiate, and negotiated
//! connections, handed from a handshake thread (`net`) to the worker that
//! will serve them, along with the control plane's requests to workers.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::export::{Attachment, Export};
use crate::meta::context::{ContextSource, SelectedContext};
use crate::net::access::Slot;
use crate::proto::handshake::{ExportInfo, Negotiated};
use crate::tls::channel::Parts;

/// The exports as one handshake sees them: their negotiation facts and,
/// per export, the source answering each context it lists (parallel to
/// `exports[e].contexts`). Contexts come and go (checkpoints), so a
/// handshake takes the offer current when it starts and keeps it.
pub struct Offer {
    pub exports: Vec<ExportInfo>,
    pub sources: Vec<Vec<Arc<dyn ContextSource>>>,
    /// What each of `exports` serves (parallel to it).
    pub targets: Vec<Arc<Export>>,
}

impl Offer {
    /// The export a negotiation chose.
    pub fn export(&self, negotiated: &Negotiated) -> Arc<Export> {
        Arc::clone(&self.targets[negotiated.export])
    }

    /// The contexts a negotiation selected, with their sources.
    pub fn selected(&self, negotiated: &Negotiated) -> Vec<SelectedContext> {
        let sources = &self.sources[negotiated.export];
        negotiated
            .contexts
            .iter()
            .map(|&(id, index)| SelectedContext { id, source: Arc::clone(&sources[index]) })
            .collect()
    }
}

/// Where handshakes get the current offer (`export::Catalog`).
pub trait Offers: Send + Sync {
    fn current(&self) -> Arc<Offer>;
}

/// A negotiated connection on its way to a worker.
pub struct NewConnection {
    pub socket: OwnedFd,
    pub negotiated: Negotiated,
    /// The export negotiated, counted as in use (it may have left the
    /// offer since the handshake began, but it was not removed).
    pub export: Attachment,
    pub contexts: Vec<SelectedContext>,
    pub peer: String,
    /// The core the socket's packets arrive on (SO_INCOMING_CPU), or for a
    /// Unix socket the core its handshake ended on; None if unknown.
    pub incoming_cpu: Option<usize>,
    /// Whether `incoming_cpu` was measured (SO_INCOMING_CPU) rather than
    /// guessed from where the handshake ended (see `worker::placement`).
    pub home_measured: bool,
    /// A TCP socket (zero-copy sends need one; Unix sockets have none).
    pub tcp: bool,
    /// The TLS session, if the client upgraded with STARTTLS.
    pub tls: Option<Parts>,
    /// Its place under the connection limits, given back when it closes.
    pub slot: Option<Slot>,
}

/// How anyone reaches one worker: its channel, its wake eventfd, its
/// connection count and the core it is pinned to.
pub struct WorkerHandle {
    pub sender: Sender<WorkerMessage>,
    pub wake: Arc<OwnedFd>,
    pub load: Arc<std::sync::atomic::AtomicUsize>,
    pub cpu: Option<usize>,
}

/// Wakes a worker (or anything else reading an eventfd).
pub fn signal_eventfd(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd; a failure only
    // means the counter is saturated, so the reader wakes anyway.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// A whole connection on its way from one worker to another (placement).
pub struct MovingConn(pub Box<crate::engine::conn::Conn>);

// SAFETY: a connection moves only when nothing of it is in flight (no
// receive, send or request: see `placement::ready_to_move`), so no kernel
// operation refers to its memory. Its raw pointers (the send msghdr's
// iovecs, the receive buffer's mapping) point into memory it owns
// exclusively; the iovecs are rebuilt before every send.
unsafe impl Send for MovingConn {}

/// What a worker receives on its channel (each send is followed by a write
/// to its wake eventfd).
pub enum WorkerMessage {
    Connection(NewConnection),
    /// A connection another worker hands over (see `worker::placement`).
    Moved(MovingConn),
    /// Hold back new mutations of image `image` and, once the worker has
    /// none of them in flight, send on `drained` (checkpoint creation: each
    /// mutation is then entirely before or entirely after the checkpoint).
    Freeze {
        image: usize,
        drained: Sender<()>,
    },
    /// Let held-back mutations of `image` go.
    Thaw {
        image: usize,
    },
    /// Close every connection to `export` as at shutdown: no new requests,
    /// the ones in flight answered (an export removed with `--force`).
    CloseExport {
        export: Arc<Export>,
    },
    /// Send a copy of the request counters (dropped unanswered when
    /// counting is off).
    Stats {
        reply: Sender<crate::engine::metrics::WorkerSnapshot>,
    },
}
