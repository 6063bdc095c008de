//! The exports on offer and the contexts each offers, as names for
//! negotiation and sources for the engine. Both change while serving
//! (checkpoints come and go; snapshot exports are added and removed); the
//! catalog keeps the current [`Offer`] ready, so a handshake costs one
//! `Arc` clone, and a connection keeps the export it negotiated even after
//! the export leaves the list.
//!
//! Per export, in this order (doc/contexts.md):
//! - `base:allocation`;
//! - for a layered image: `qemu:allocation-depth`;
//! - for a tracked image: `qemu:dirty-bitmap:NAME` for each valid
//!   checkpoint, `ringnbd:era`, and `ringnbd:checkpoint:ERA:NAME` for each
//!   valid checkpoint.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::Backend;
use crate::engine::handoff::{Offer, Offers};
use crate::meta::allocation_depth::{self, AllocationDepth};
use crate::meta::base_allocation::{self, Allocation};
use crate::meta::changes::{self, DirtySince, Eras};
use crate::meta::context::ContextSource;

use super::Export;

pub struct Catalog {
    exports: Mutex<Arc<[Arc<Export>]>>,
    current: Mutex<Arc<Offer>>,
    /// The id the next image added while serving gets: ids of the images
    /// the server started with are their positions (workers index
    /// per-image state by them), later ones come after.
    next_image_id: AtomicUsize,
}

impl Catalog {
    pub fn new(exports: Arc<[Arc<Export>]>) -> Self {
        let current = Mutex::new(Arc::new(build(&exports)));
        let next_image_id = AtomicUsize::new(super::images(&exports).len());
        Self { exports: Mutex::new(exports), current, next_image_id }
    }

    /// The exports on offer now.
    pub fn exports(&self) -> Arc<[Arc<Export>]> {
        Arc::clone(&self.exports.lock().expect("catalog lock"))
    }

    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.exports().iter().find(|e| e.info.name == name).cloned()
    }

    /// An id for an image added while serving.
    pub fn new_image_id(&self) -> usize {
        self.next_image_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Offers `export` to handshakes from now on. Fails (giving it back)
    /// when an export of that name exists.
    pub fn add(&self, export: Arc<Export>) -> Result<(), Arc<Export>> {
        let mut exports = self.exports.lock().expect("catalog lock");
        if exports.iter().any(|e| e.info.name == export.info.name) {
            return Err(export);
        }
        *exports = exports.iter().cloned().chain(std::iter::once(export)).collect();
        self.publish(&exports);
        Ok(())
    }

    /// Stops offering the export `name` (connections to it keep it until
    /// they close). None if there is none.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut exports = self.exports.lock().expect("catalog lock");
        let removed = exports.iter().find(|e| e.info.name == name).cloned()?;
        *exports = exports.iter().filter(|e| e.info.name != name).cloned().collect();
        self.publish(&exports);
        Some(removed)
    }

    /// Rebuilds the offer after checkpoints changed; handshakes that start
    /// from now on see the new contexts.
    pub fn refresh(&self) {
        let exports = self.exports.lock().expect("catalog lock");
        self.publish(&exports);
    }

    /// Called with the export list locked, so offers are published in the
    /// order the list changed.
    fn publish(&self, exports: &[Arc<Export>]) {
        let offer = Arc::new(build(exports));
        *self.current.lock().expect("catalog lock") = offer;
    }
}

impl Offers for Catalog {
    fn current(&self) -> Arc<Offer> {
        Arc::clone(&self.current.lock().expect("catalog lock"))
    }
}

fn build(exports: &[Arc<Export>]) -> Offer {
    let mut infos = Vec::with_capacity(exports.len());
    let mut sources = Vec::with_capacity(exports.len());
    for export in exports {
        let contexts = contexts_of(export);
        let mut info = export.info.clone();
        info.contexts = contexts.iter().map(|(name, _)| name.clone()).collect();
        infos.push(info);
        sources.push(contexts.into_iter().map(|(_, source)| source).collect());
    }
    Offer { exports: infos, sources, targets: exports.to_vec() }
}

fn contexts_of(export: &Export) -> Vec<(String, Arc<dyn ContextSource>)> {
    let image = &export.image;
    let mut out: Vec<(String, Arc<dyn ContextSource>)> =
        vec![(base_allocation::NAME.to_owned(), Arc::new(Allocation { image: Arc::clone(image) }))];
    if matches!(image.backend, Backend::Layered(_)) {
        out.push((allocation_depth::NAME.to_owned(), Arc::new(AllocationDepth { image: Arc::clone(image) })));
    }
    let Some(tracker) = &image.track else { return out };
    let valid: Vec<_> = tracker.checkpoints().into_iter().filter(|c| c.valid).collect();
    let since = |era| -> Arc<dyn ContextSource> { Arc::new(DirtySince { tracker: Arc::clone(tracker), since: era }) };
    for checkpoint in &valid {
        out.push((changes::dirty_bitmap_name(checkpoint), since(checkpoint.era)));
    }
    out.push((changes::ERA_NAME.to_owned(), Arc::new(Eras { tracker: Arc::clone(tracker) })));
    for checkpoint in &valid {
        out.push((changes::checkpoint_name(checkpoint), since(checkpoint.era)));
    }
    out
}
