//! Exports: the negotiation-facing description of each export, and the
//! [`Image`] (storage, extent cache, block locks) it serves. Several exports
//! of one file share one image, so what one of them writes is what every
//! other one reports.

pub mod catalog;
pub mod flags;
pub mod image;
pub mod snapshot;
pub mod tracking;
pub mod usage;

use std::sync::Arc;

use thiserror::Error;

use crate::backend::layers::{LayerSpec, Top};
use crate::backend::{Backend, BackendError, FileBackend, FileIdentity, Layered, MemoryBackend};
use crate::proto::handshake::ExportInfo;

pub use catalog::Catalog;
pub use image::Image;
pub use tracking::TrackOptions;
pub use usage::{Attachment, Usage};

/// What to export and under which name, before it is opened (from the
/// command line today; `cli::export_spec` parses it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: Option<String>,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(std::path::PathBuf),
    Memory(u64),
    /// A layered export (`backend::layers`).
    Layers(LayerSpec),
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ExportError {
    /// Two exports with one name.
    #[error("duplicate export name {0:?}")]
    DuplicateName(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Change tracking could not start (the message names the file).
    #[error("change tracking: {0}")]
    Tracking(String),
    /// Another process holds the image's lock.
    #[error("{0}: in use by another process (a second ringnbd, or qemu, holds its lock)")]
    InUse(std::path::PathBuf),
    /// A writable export of a file another export serves read-only.
    #[error("{0}: already served read-only by another export; serve it writable there too, or read-only here")]
    ReadOnlyShared(std::path::PathBuf),
    /// `--checkpoint` for an export without tracking, or a bad name.
    #[error("--checkpoint {0}")]
    Checkpoint(String),
}

/// Options shared by every export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub read_only: bool,
    pub direct_io: bool,
    /// `--description [NAME=]TEXT` values: for the export NAME when it is
    /// one, else for every export without its own (the last one wins).
    pub descriptions: Vec<String>,
    pub payload_bytes_max: u32,
    /// Extent-cache capacity per file export; 0 turns the cache off.
    pub extent_cache_entries: usize,
    /// Advertise the O_DIRECT alignment as the minimum block size.
    pub strict_alignment: bool,
    pub tracking: TrackOptions,
    /// `--checkpoint [EXPORT=]NAME` values: checkpoints to create at start
    /// (where absent) on EXPORT, or on every tracked export.
    pub checkpoints: Vec<String>,
}

pub struct Export {
    pub info: ExportInfo,
    pub image: Arc<Image>,
    pub read_only: bool,
    /// Its connections, and whether it has been removed.
    pub usage: Usage,
}

impl Export {
    /// An export of `image`; `index` names unnamed memory exports.
    fn new(spec: &ExportSpec, index: usize, image: Arc<Image>, options: &ExportOptions) -> Self {
        let backend = &image.backend;
        let default_name = match (&spec.source, backend) {
            (Source::File(path), _) => {
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| format!("export{index}"))
            }
            (Source::Memory(_), _) => format!("memory{index}"),
            (Source::Layers(layers), _) => {
                let named = match &layers.top {
                    Top::File(top) => top,
                    Top::Throwaway => &layers.lowers[0],
                };
                named.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| format!("export{index}"))
            }
        };
        let name = spec.name.clone().unwrap_or(default_name);
        let description = flags::describe(backend, options.read_only);
        let info = ExportInfo {
            name,
            description,
            size: backend.size(),
            flags: flags::transmission_flags(backend, options.read_only),
            block_size: flags::block_size(backend, options.payload_bytes_max, options.strict_alignment),
            // Filled in per handshake by the catalog: they change.
            contexts: Vec::new(),
            tls_only: false,
        };
        Self { info, image, read_only: options.read_only, usage: Usage::default() }
    }
}

/// What one export sets for itself (a config file's export table), over
/// the global options; None keeps the global value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportOverrides {
    pub read_only: Option<bool>,
    pub direct_io: Option<bool>,
    pub extent_cache: Option<bool>,
    pub strict_alignment: Option<bool>,
    pub track: Option<bool>,
    pub description: Option<String>,
    /// Checkpoints created at start where absent.
    pub checkpoints: Vec<String>,
}

/// An export to open: what it serves and what it sets for itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub spec: ExportSpec,
    pub overrides: ExportOverrides,
}

impl From<ExportSpec> for ExportEntry {
    fn from(spec: ExportSpec) -> Self {
        Self { spec, overrides: ExportOverrides::default() }
    }
}

impl ExportOptions {
    /// These options with an export's own settings applied.
    fn with(&self, overrides: &ExportOverrides) -> ExportOptions {
        let mut options = self.clone();
        options.read_only = overrides.read_only.unwrap_or(self.read_only);
        options.direct_io = overrides.direct_io.unwrap_or(self.direct_io);
        options.strict_alignment = overrides.strict_alignment.unwrap_or(self.strict_alignment);
        match overrides.extent_cache {
            Some(false) => options.extent_cache_entries = 0,
            Some(true) if self.extent_cache_entries == 0 => options.extent_cache_entries = EXTENT_CACHE_ENTRIES_DEFAULT,
            _ => {}
        }
        options.tracking.files = overrides.track.unwrap_or(self.tracking.files);
        options
    }
}

#[cfg(test)]
impl ExportOptions {
    /// Writable, buffered, untracked, no extent cache: what unit tests of
    /// exports start from.
    pub fn for_tests() -> Self {
        ExportOptions {
            read_only: false,
            direct_io: false,
            descriptions: Vec::new(),
            payload_bytes_max: 1 << 25,
            extent_cache_entries: 0,
            strict_alignment: false,
            tracking: TrackOptions::default(),
            checkpoints: Vec::new(),
        }
    }
}

/// Extents cached per file when an export turns its cache on while the
/// global one is off.
pub const EXTENT_CACHE_ENTRIES_DEFAULT: usize = 4 << 20;

/// Opens every export. Paths that reach the same file (or device) share one
/// image: a second extent cache would go stale on the first one's writes.
pub fn open_all(specs: &[ExportSpec], options: &ExportOptions) -> Result<Vec<Export>, ExportError> {
    let entries: Vec<ExportEntry> = specs.iter().cloned().map(ExportEntry::from).collect();
    open_entries(&entries, options)
}

/// [`open_all`] for exports that may set options of their own.
pub fn open_entries(entries: &[ExportEntry], global: &ExportOptions) -> Result<Vec<Export>, ExportError> {
    let mut exports: Vec<Export> = Vec::with_capacity(entries.len());
    // Ids of the images the server starts with are 0, 1, ... in order.
    let mut next_id = 0;
    for (index, entry) in entries.iter().enumerate() {
        let shared = |identity: &FileIdentity| {
            exports.iter().find(|e| file_identity(&e.image) == Some(*identity)).map(|e| Arc::clone(&e.image))
        };
        let export = open_entry(entry, global, index, &shared, next_id)?;
        if export.image.id == next_id {
            next_id += 1;
        }
        if exports.iter().any(|e| e.info.name == export.info.name) {
            return Err(ExportError::DuplicateName(export.info.name));
        }
        exports.push(export);
    }
    apply_descriptions(&mut exports, &global.descriptions);
    create_start_checkpoints(&exports, &global.checkpoints)?;
    for (export, entry) in exports.iter_mut().zip(entries) {
        if let Some(text) = &entry.overrides.description {
            export.info.description = text.clone();
        }
        for name in &entry.overrides.checkpoints {
            create_start_checkpoint(export, name, name)?;
        }
    }
    Ok(exports)
}

/// What an export says about itself when nothing sets its description.
pub fn default_description(image: &Image, read_only: bool) -> String {
    flags::describe(&image.backend, read_only)
}

/// Which file an image serves, for a plain file export.
pub fn file_identity(image: &Image) -> Option<FileIdentity> {
    match &image.backend {
        Backend::File(file) => Some(file.identity),
        _ => None,
    }
}

/// Opens one export: a file already open in `shared` (found by identity)
/// is served through its image, so every export of a file sees one extent
/// cache and one set of block locks; anything else gets a new image with
/// `id`. `index` names unnamed exports. The export's own description and
/// checkpoints are left to the caller.
pub fn open_entry(
    entry: &ExportEntry,
    global: &ExportOptions,
    index: usize,
    shared: &dyn Fn(&FileIdentity) -> Option<Arc<Image>>,
    id: usize,
) -> Result<Export, ExportError> {
    let (spec, options) = (&entry.spec, global.with(&entry.overrides));
    let new_image = |mut backend: Backend, cache_entries: usize| -> Result<Arc<Image>, ExportError> {
        let track = tracking::open(&backend, &options.tracking, options.read_only)?;
        if let Backend::File(file) = &mut backend {
            file.probe_hole_punching();
        }
        Ok(Arc::new(Image::new(id, backend, cache_entries, track)))
    };
    let image = match &spec.source {
        Source::File(path) => {
            let file = FileBackend::open(path, options.read_only, options.direct_io)?;
            match shared(&file.identity) {
                Some(image) => {
                    if let Backend::File(open) = &image.backend
                        && open.is_read_only()
                        && !options.read_only
                    {
                        return Err(ExportError::ReadOnlyShared(path.clone()));
                    }
                    image
                }
                None => new_image(Backend::File(file), options.extent_cache_entries)?,
            }
        }
        Source::Memory(size) => new_image(Backend::Memory(MemoryBackend::new(*size)), 0)?,
        Source::Layers(layers) => {
            let layered = Layered::open(layers, options.read_only, options.direct_io)?;
            new_image(Backend::Layered(layered), 0)?
        }
    };
    Ok(Export::new(spec, index, image, &options))
}

/// `--checkpoint [EXPORT=]NAME`: created where absent, before any client
/// can write, so scripts get a fixed starting point without the control
/// socket. One that exists is kept (an invalid one is reported, not
/// replaced: deleting it is the owner's decision).
fn create_start_checkpoints(exports: &[Export], wanted: &[String]) -> Result<(), ExportError> {
    for value in wanted {
        let named = value.split_once('=').filter(|(export, _)| exports.iter().any(|e| e.info.name == *export));
        let (targets, name): (Vec<&Export>, &str) = match named {
            Some((export, name)) => (exports.iter().filter(|e| e.info.name == export).collect(), name),
            None => (exports.iter().filter(|e| e.image.track.is_some()).collect(), value.as_str()),
        };
        if targets.is_empty() {
            return Err(ExportError::Checkpoint(format!("{value}: no export is tracked (add --track)")));
        }
        for export in targets {
            create_start_checkpoint(export, name, value)?;
        }
    }
    Ok(())
}

/// Creates checkpoint `name` on `export` unless it exists; `asked` is how
/// it was asked for, for messages.
pub fn create_start_checkpoint(export: &Export, name: &str, asked: &str) -> Result<(), ExportError> {
    let Some(tracker) = &export.image.track else {
        return Err(ExportError::Checkpoint(format!(
            "{asked}: export {:?} is not tracked (add --track, or track = true in its table)",
            export.info.name
        )));
    };
    match tracker.find(name) {
        Some(c) if !c.valid => crate::note!(
            "export {:?}: checkpoint {name:?} is invalid and kept as it is; delete it to start over",
            export.info.name
        ),
        Some(_) => {}
        None => {
            tracker.create(name).map_err(|e| ExportError::Checkpoint(format!("{asked}: {e}")))?;
        }
    }
    Ok(())
}

/// Gives each export the description meant for it (see
/// `ExportOptions::descriptions`).
pub fn apply_descriptions(exports: &mut [Export], descriptions: &[String]) {
    let names: Vec<String> = exports.iter().map(|e| e.info.name.clone()).collect();
    fn named<'a>(text: &'a str, names: &[String]) -> Option<(&'a str, &'a str)> {
        text.split_once('=').filter(|(name, _)| names.iter().any(|n| n == name))
    }
    let general = descriptions.iter().rev().find(|d| named(d, &names).is_none());
    for export in exports {
        let own = descriptions.iter().rev().find_map(|d| named(d, &names).filter(|(n, _)| *n == export.info.name));
        if let Some((_, text)) = own {
            export.info.description = text.to_owned();
        } else if let Some(text) = general {
            export.info.description = text.clone();
        }
    }
}

/// The distinct images behind `exports`, each once, in `Image::id` order.
pub fn images(exports: &[Arc<Export>]) -> Vec<Arc<Image>> {
    let mut seen: Vec<Arc<Image>> = Vec::new();
    for export in exports {
        if !seen.iter().any(|i| Arc::ptr_eq(i, &export.image)) {
            seen.push(Arc::clone(&export.image));
        }
    }
    seen.sort_by_key(|image| image.id);
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::*;

    #[test]
    fn read_only_exports_do_not_offer_writes() {
        let options = ExportOptions { read_only: true, ..ExportOptions::for_tests() };
        let e = open_all(&["memory:1M".parse().unwrap()], &options).unwrap().remove(0);
        assert_ne!(e.info.flags & TF_READ_ONLY, 0);
        assert_eq!(e.info.flags & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO), 0);
        assert_ne!(e.info.flags & TF_CAN_MULTI_CONN, 0);
        assert_eq!(e.info.name, "memory0");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let options = ExportOptions::for_tests();
        let specs = vec!["a=memory:1M".parse().unwrap(), "a=memory:2M".parse().unwrap()];
        assert!(matches!(open_all(&specs, &options), Err(ExportError::DuplicateName(_))));
    }

    #[test]
    fn descriptions_apply_per_export_or_to_all() {
        let options = |descriptions: &[&str]| ExportOptions {
            descriptions: descriptions.iter().map(|d| d.to_string()).collect(),
            ..ExportOptions::for_tests()
        };
        let specs: Vec<ExportSpec> = vec!["a=memory:1M".parse().unwrap(), "b=memory:1M".parse().unwrap()];
        let texts = |d: &[&str]| -> Vec<String> {
            open_all(&specs, &options(d)).unwrap().into_iter().map(|e| e.info.description).collect()
        };
        assert_eq!(texts(&["b=the b disk", "for everyone"]), vec!["for everyone", "the b disk"]);
        assert_eq!(texts(&["x=y is general"]), vec!["x=y is general", "x=y is general"]);
        assert!(texts(&[])[0].contains("sparse memory"), "the default says what it is");
    }
}

#[cfg(test)]
mod sharing_tests {
    use super::*;

    #[test]
    fn exports_of_one_file_share_one_image() {
        let dir = std::env::temp_dir().join(format!("ringnbd-export-share-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.img");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        std::os::unix::fs::symlink(&path, dir.join("link.img")).unwrap();
        let options = ExportOptions { extent_cache_entries: 1000, ..ExportOptions::for_tests() };
        let specs: Vec<ExportSpec> = [format!("a={}", path.display()), format!("b={}/link.img", dir.display())]
            .iter()
            .map(|s| s.parse().unwrap())
            .chain(["m=memory:1M".parse().unwrap()])
            .collect();
        let exports: Vec<Arc<Export>> = open_all(&specs, &options).unwrap().into_iter().map(Arc::new).collect();
        assert!(Arc::ptr_eq(&exports[0].image, &exports[1].image), "one file, one image");
        assert!(exports[0].image.extent_cache.is_some());
        assert_eq!(images(&exports).len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
