//! `qemu:allocation-depth` as a [`ContextSource`], for layered exports:
//! each extent's status is the depth of the layer its data comes from, as
//! qemu defines it (0 no layer holds it and it reads as zeroes, 1 the top,
//! 2 the layer below, and so on). Answered inline from the layers' maps,
//! which live in memory.

use std::sync::Arc;

use crate::backend::Backend;
use crate::backend::layers::CHUNK_BYTES;
use crate::export::Image;
use crate::proto::extent::Extent;

use super::context::{ContextSource, Gathered, Query, granular_bound};

pub const NAME: &str = "qemu:allocation-depth";

pub struct AllocationDepth {
    pub image: Arc<Image>,
}

impl ContextSource for AllocationDepth {
    fn extents_bound(&self, length: u64, extents_max: usize) -> usize {
        // Runs change at chunk boundaries, or where a short lower layer ends
        // (once per layer).
        let Backend::Layered(layers) = &self.image.backend else { unreachable!("offered for layered exports only") };
        (granular_bound(length, CHUNK_BYTES, usize::MAX) + layers.lowers.len()).min(extents_max)
    }

    fn gather(&self, query: &Query, out: &mut Vec<Extent>) -> Gathered {
        let Backend::Layered(layers) = &self.image.backend else { unreachable!("offered for layered exports only") };
        layers.depths(query.offset, query.end().min(layers.size()), query.extents_max, out);
        Gathered::Ready
    }
}
