//! The contexts each export offers, as names for negotiation and sources
//! for the engine. The list changes when checkpoints do; the catalog keeps
//! the current [`Offer`] ready, so a handshake costs one `Arc` clone.
//!
//! Per export, in this order (doc/contexts.md):
//! - `base:allocation`;
//! - for a tracked image: `qemu:dirty-bitmap:NAME` for each valid
//!   checkpoint, `ringnbd:era`, and `ringnbd:checkpoint:ERA:NAME` for each
//!   valid checkpoint.

use std::sync::{Arc, Mutex};

use crate::engine::handoff::{Offer, Offers};
use crate::meta::base_allocation::{self, Allocation};
use crate::meta::changes::{self, DirtySince, Eras};
use crate::meta::context::ContextSource;

use super::Export;

pub struct Catalog {
    exports: Arc<[Arc<Export>]>,
    current: Mutex<Arc<Offer>>,
}

impl Catalog {
    pub fn new(exports: Arc<[Arc<Export>]>) -> Self {
        let current = Mutex::new(Arc::new(build(&exports)));
        Self { exports, current }
    }

    pub fn exports(&self) -> &Arc<[Arc<Export>]> {
        &self.exports
    }

    /// Rebuilds the offer after checkpoints changed; handshakes that start
    /// from now on see the new contexts.
    pub fn refresh(&self) {
        let offer = Arc::new(build(&self.exports));
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
    Offer { exports: infos, sources }
}

fn contexts_of(export: &Export) -> Vec<(String, Arc<dyn ContextSource>)> {
    let image = &export.image;
    let mut out: Vec<(String, Arc<dyn ContextSource>)> =
        vec![(base_allocation::NAME.to_owned(), Arc::new(Allocation { image: Arc::clone(image) }))];
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
