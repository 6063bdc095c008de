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
    /// Ids of images that are gone, for reuse.
    free_image_ids: Mutex<Vec<usize>>,
}

impl Catalog {
    pub fn new(exports: Arc<[Arc<Export>]>) -> Self {
        let current = Mutex::new(Arc::new(build(&exports)));
        let next_image_id = AtomicUsize::new(super::images(&exports).len());
        Self { exports: Mutex::new(exports), current, next_image_id, free_image_ids: Mutex::new(Vec::new()) }
    }

    /// The exports on offer now.
    pub fn exports(&self) -> Arc<[Arc<Export>]> {
        Arc::clone(&self.exports.lock().expect("catalog lock"))
    }

    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.exports().iter().find(|e| e.info.name == name).cloned()
    }

    /// An id for an image added while serving: one given back, else the
    /// next unused one (so ids stay dense: workers keep state by id).
    pub fn new_image_id(&self) -> usize {
        if let Some(id) = self.free_image_ids.lock().expect("catalog lock").pop() {
            return id;
        }
        self.next_image_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Gives back the id of an image nothing serves any more (no
    /// connection to it is left, so no worker holds state for it).
    pub fn release_image_id(&self, id: usize) {
        self.free_image_ids.lock().expect("catalog lock").push(id);
    }

    /// Offers `export` in place of the export of the same name (in the
    /// same position); connections to the old one keep it. None if there
    /// is no export of that name.
    pub fn replace(&self, export: Arc<Export>) -> Option<Arc<Export>> {
        let mut exports = self.exports.lock().expect("catalog lock");
        let position = exports.iter().position(|e| e.info.name == export.info.name)?;
        let old = Arc::clone(&exports[position]);
        let mut next = exports.to_vec();
        next[position] = export;
        *exports = next.into();
        self.publish(&exports);
        Some(old)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{ExportOptions, Usage, open_all};

    fn exports(specs: &[&str]) -> Vec<Arc<Export>> {
        let options = ExportOptions::for_tests();
        let specs: Vec<_> = specs.iter().map(|s| s.parse().unwrap()).collect();
        open_all(&specs, &options).unwrap().into_iter().map(Arc::new).collect()
    }

    #[test]
    fn replacing_keeps_the_position_and_handshakes_see_the_new_export() {
        let start = exports(&["a=memory:1M", "b=memory:1M"]);
        let catalog = Catalog::new(start.iter().cloned().collect());
        let before = catalog.current();
        let mut info = start[0].info.clone();
        info.description = "new".into();
        let new =
            Arc::new(Export { info, image: Arc::clone(&start[0].image), read_only: false, usage: Usage::default() });
        let old = catalog.replace(Arc::clone(&new)).unwrap();
        assert!(Arc::ptr_eq(&old, &start[0]));
        let after = catalog.current();
        assert_eq!(after.exports.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(after.exports[0].description, "new");
        assert!(Arc::ptr_eq(&after.targets[0], &new));
        assert_ne!(before.exports[0].description, "new", "a handshake already under way keeps its offer");
        assert!(catalog.replace(exports(&["zzz=memory:1M"]).remove(0)).is_none());
    }

    #[test]
    fn image_ids_given_back_are_reused_before_new_ones() {
        let catalog = Catalog::new(exports(&["a=memory:1M", "b=memory:1M"]).into());
        let (first, second) = (catalog.new_image_id(), catalog.new_image_id());
        assert_eq!((first, second), (2, 3), "after the start images");
        catalog.release_image_id(first);
        assert_eq!(catalog.new_image_id(), 2);
        assert_eq!(catalog.new_image_id(), 4);
    }
}
