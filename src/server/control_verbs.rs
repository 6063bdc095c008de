//! What the control socket's verbs do to a running server.
//!
//! Creating a checkpoint: check the request (so a bad one never stalls
//! writes), freeze the image's mutations on every worker and wait until
//! none is in flight, cut the checkpoint (durable before it returns), thaw,
//! and refresh the catalog so new connections see the new contexts.
//! Checkpoint changes are serialized; status and listing never wait.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::Backend;
use crate::backend::copy_before_write::ScratchPolicy;
use crate::control::Handler;
use crate::control::protocol::{ControlError, ErrorKind, Verb};
use crate::export::snapshot::{self, Holder, Snapshot, SnapshotError, Snapshots};
use crate::export::{Catalog, Export};
use crate::meta::changes;
use crate::track::{Checkpoint, TrackError, Tracker};

use super::workers::{FreezeError, Workers};

/// How long a checkpoint waits for the writes in flight to finish.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stats reader waits for each worker's counters.
pub const STATS_WAIT: Duration = Duration::from_secs(1);

pub struct Verbs {
    pub catalog: Arc<Catalog>,
    pub workers: Arc<Workers>,
    pub snapshots: Arc<Snapshots>,
    /// Scratch space of each copy-before-write snapshot.
    pub scratch: ScratchPolicy,
    pub started: Instant,
    /// One checkpoint change at a time (freezes must not interleave).
    pub changing: Mutex<()>,
    /// Workers count requests (`--stats on`).
    pub counting: bool,
    /// Exports added and removed while serving (set once, before serving).
    pub admin: std::sync::OnceLock<Arc<super::export_admin::ExportAdmin>>,
}

fn error(kind: ErrorKind, message: impl Into<String>) -> ControlError {
    ControlError::new(kind, message)
}

impl From<SnapshotError> for ControlError {
    fn from(e: SnapshotError) -> Self {
        let kind = match &e {
            SnapshotError::CannotClone(..) | SnapshotError::NotAFile(_) => ErrorKind::Unsupported,
            SnapshotError::Io(..) => ErrorKind::Io,
        };
        ControlError::new(kind, e.to_string())
    }
}

/// With the image frozen: what holds the snapshot's data (a clone, or the
/// start of copy-before-write where the file system cannot clone), the
/// tracking state as of now, and the checkpoint. Nothing is left at `path`
/// and nothing stays registered on failure.
fn cut_snapshot(
    live: &Export,
    tracker: &Tracker,
    path: &Path,
    name: &str,
    scratch: ScratchPolicy,
) -> Result<(Holder, Checkpoint, Tracker), ControlError> {
    let file = snapshot::file_of(live)?;
    let holder = match snapshot::reflink(file, path) {
        Ok(()) => Holder::Clone,
        Err(SnapshotError::CannotClone(..)) => {
            Holder::CopyBeforeWrite(snapshot::start_copy_before_write(live, name, path, scratch)?)
        }
        Err(e) => return Err(e.into()),
    };
    let cut = tracker
        .frozen_copy()
        .map_err(|e| ControlError::from(SnapshotError::Io(path.to_owned(), e)))
        .and_then(|changes| Ok((tracker.create(name)?, changes)));
    match cut {
        Ok((checkpoint, changes)) => Ok((holder, checkpoint, changes)),
        Err(e) => {
            if let Holder::CopyBeforeWrite(preservation) = &holder {
                live.image.remove_copy_before_write(preservation);
            }
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

fn snapshot_json(s: &Snapshot) -> Value {
    let (kind, scratch_bytes, broken) = match &s.holder {
        Holder::Clone => ("reflink", None, false),
        Holder::CopyBeforeWrite(p) => ("copy-before-write", Some(p.scratch_bytes()), p.is_broken()),
    };
    json!({
        "export": s.export,
        "checkpoint": s.checkpoint,
        "name": s.name,
        "kind": kind,
        "file": s.path.display().to_string(),
        "scratch_bytes": scratch_bytes,
        "broken": broken,
        "created_unix_ms": s.created_unix_ms,
    })
}

impl From<TrackError> for ControlError {
    fn from(e: TrackError) -> Self {
        let kind = match &e {
            TrackError::BadName(_) => ErrorKind::BadName,
            TrackError::Duplicate(_) => ErrorKind::Duplicate,
            TrackError::Unknown(_) => ErrorKind::UnknownCheckpoint,
            TrackError::TooMany => ErrorKind::TooMany,
            TrackError::ReadOnly => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        };
        ControlError::new(kind, e.to_string())
    }
}

fn checkpoint_json(export: &str, c: &Checkpoint) -> Value {
    json!({
        "export": export,
        "name": c.name,
        "era": c.era,
        "created_unix_ms": c.created_unix_ms,
        "valid": c.valid,
        "contexts": if c.valid {
            json!([changes::dirty_bitmap_name(c), changes::checkpoint_name(c)])
        } else {
            json!([])
        },
    })
}

impl Verbs {
    fn export(&self, name: &str) -> Result<Arc<Export>, ControlError> {
        self.catalog.find(name).ok_or_else(|| error(ErrorKind::UnknownExport, format!("no export named {name:?}")))
    }

    fn tracker<'a>(&self, export: &'a Export) -> Result<&'a Arc<Tracker>, ControlError> {
        export.image.track.as_ref().ok_or_else(|| {
            if let Backend::Layered(_) = export.image.backend {
                let message = format!("export {:?} is layered: layered exports are not tracked", export.info.name);
                return error(ErrorKind::NotTracked, message);
            }
            error(
                ErrorKind::NotTracked,
                format!("export {:?} does not track changes (start with --track)", export.info.name),
            )
        })
    }

    fn stats(&self) -> Result<Value, ControlError> {
        if !self.counting {
            return Err(ControlError::new(ErrorKind::NotCounting, "request counting is off (--stats off)"));
        }
        Ok(super::stats::Stats::new(self.workers.count(), self.workers.snapshots(STATS_WAIT)).json())
    }

    fn status(&self) -> Value {
        let exports: Vec<Value> = self
            .catalog
            .exports()
            .iter()
            .map(|e| {
                let tracking = e.image.track.as_ref().map(|t| {
                    let checkpoints = t.checkpoints();
                    json!({
                        "state_file": t.state_path().map(|p| p.display().to_string()),
                        "granule_bytes": t.granule_bytes(),
                        "current_era": t.current_era(),
                        "checkpoints": checkpoints.len(),
                        "invalid_checkpoints": checkpoints.iter().filter(|c| !c.valid).count(),
                    })
                });
                let layers = match &e.image.backend {
                    Backend::Layered(l) => json!({
                        "top": if l.throwaway { Value::Null } else { json!(l.top.path.display().to_string()) },
                        "throwaway": l.throwaway,
                        "top_map": l.top_map_path().map(|p| p.display().to_string()),
                        "top_chunks": l.top_chunks(),
                        "chunks_copied_up": l.chunks_copied_up(),
                        "chunk_bytes": crate::backend::layers::CHUNK_BYTES,
                        "lowers": l.lowers.iter().map(|lower| lower.file.path.display().to_string()).collect::<Vec<_>>(),
                    }),
                    _ => Value::Null,
                };
                json!({
                    "name": e.info.name,
                    "size": e.info.size,
                    "read_only": e.read_only,
                    "tracking": tracking,
                    "layers": layers,
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "workers": self.workers.count(),
            "connections": self.workers.connections(),
            "exports": exports,
        })
    }

    /// Holds back the mutations of `export`'s image on every worker until
    /// none is in flight (see `Workers::freeze`).
    fn freeze(&self, export: &Export) -> Result<(), ControlError> {
        self.workers.freeze(export.image.id, FREEZE_TIMEOUT).map_err(|e| match e {
            FreezeError::Timeout => error(
                ErrorKind::Busy,
                format!(
                    "writes in flight on {:?} did not finish within {} s; try again",
                    export.info.name,
                    FREEZE_TIMEOUT.as_secs()
                ),
            ),
            FreezeError::ShuttingDown => error(ErrorKind::ShuttingDown, "the server is shutting down"),
        })
    }

    fn create(&self, export_name: &str, name: &str) -> Result<Value, ControlError> {
        let export = self.export(export_name)?;
        let tracker = self.tracker(&export)?;
        let _one_at_a_time = self.changing.lock().expect("control lock");
        tracker.check_create(name)?;
        let image = export.image.id;
        self.freeze(&export)?;
        let created = tracker.create(name);
        self.workers.thaw(image);
        let checkpoint = created?;
        self.catalog.refresh();
        Ok(checkpoint_json(export_name, &checkpoint))
    }

    fn list(&self, export_name: &str) -> Result<Value, ControlError> {
        let export = self.export(export_name)?;
        let tracker = self.tracker(&export)?;
        let checkpoints: Vec<Value> = tracker.checkpoints().iter().map(|c| checkpoint_json(export_name, c)).collect();
        Ok(json!({ "export": export_name, "current_era": tracker.current_era(), "checkpoints": checkpoints }))
    }

    fn delete(&self, export_name: &str, name: &str) -> Result<Value, ControlError> {
        let export = self.export(export_name)?;
        let tracker = self.tracker(&export)?;
        let _one_at_a_time = self.changing.lock().expect("control lock");
        tracker.delete(name)?;
        self.catalog.refresh();
        Ok(json!({ "export": export_name, "name": name }))
    }
}

impl Verbs {
    /// A checkpoint and, atomically with it, the read-only export
    /// `EXPORT@NAME` reading as the export did at that instant.
    fn snapshot_create(&self, export_name: &str, name: &str) -> Result<Value, ControlError> {
        let export = self.export(export_name)?;
        let tracker = self.tracker(&export)?;
        if export.read_only {
            return Err(error(
                ErrorKind::ReadOnly,
                format!("export {export_name:?} is read-only: it needs no snapshot"),
            ));
        }
        let file = snapshot::file_of(&export)?;
        let _one_at_a_time = self.changing.lock().expect("control lock");
        tracker.check_create(name)?;
        let snapshot_name = snapshot::export_name(export_name, name);
        if self.catalog.find(&snapshot_name).is_some() {
            return Err(error(ErrorKind::Duplicate, format!("an export named {snapshot_name:?} exists")));
        }
        // Eras change only in `create`, which this lock serializes.
        let Some(base) = snapshot::files_base(file, tracker) else {
            return Err(error(
                ErrorKind::Unsupported,
                format!("export {export_name:?} keeps no state file to name snapshots after"),
            ));
        };
        let path = snapshot::clone_path(base, tracker.current_era());
        self.freeze(&export)?;
        let cut = cut_snapshot(&export, tracker, &path, name, self.scratch);
        self.workers.thaw(export.image.id);
        let (holder, checkpoint, changes) = cut?;
        self.catalog.refresh();
        let record = Snapshot {
            export: export_name.to_owned(),
            live: Arc::clone(&export.image),
            checkpoint: name.to_owned(),
            name: snapshot_name,
            path,
            holder,
            created_unix_ms: checkpoint.created_unix_ms,
        };
        let served =
            snapshot::open_export(&export, name, &record.path, &record.holder, changes, self.catalog.new_image_id());
        // Registered first, so a failure below releases what it holds.
        self.snapshots.add(record.clone());
        let added = served.map_err(ControlError::from).and_then(|served| {
            self.catalog
                .add(Arc::new(served))
                .map_err(|_| error(ErrorKind::Duplicate, format!("an export named {:?} exists", record.name)))
        });
        if let Err(e) = added {
            // Nothing is left of a snapshot that could not be served, its
            // checkpoint included.
            self.snapshots.remove(export_name, name);
            let _ = tracker.delete(name);
            return Err(e);
        }
        let reply =
            json!({ "snapshot": snapshot_json(&record), "checkpoint": checkpoint_json(export_name, &checkpoint) });
        Ok(reply)
    }

    /// Blocking: copies every chunk of the top (doc/layers.md).
    fn layer_commit(&self, export_name: &str) -> Result<Value, ControlError> {
        let export = self.export(export_name)?;
        let Backend::Layered(layers) = &export.image.backend else {
            return Err(error(ErrorKind::NotLayered, format!("export {export_name:?} has no layers")));
        };
        let started = Instant::now();
        let chunks = layers.commit().map_err(|message| error(ErrorKind::Io, message))?;
        let into = layers.lowers[0].file.path.display().to_string();
        crate::note!("export {export_name:?}: committed {chunks} chunk(s) of the top into {into}");
        Ok(json!({
            "export": export_name,
            "into": into,
            "chunks": chunks,
            "bytes": chunks as u64 * crate::backend::layers::CHUNK_BYTES,
            "elapsed_ms": started.elapsed().as_millis() as u64,
        }))
    }

    fn snapshot_list(&self, export_name: Option<&str>) -> Result<Value, ControlError> {
        if let Some(name) = export_name {
            self.export(name)?;
        }
        let snapshots: Vec<Value> = self
            .snapshots
            .list()
            .iter()
            .filter(|s| export_name.is_none_or(|name| s.export == name))
            .map(snapshot_json)
            .collect();
        Ok(json!({ "snapshots": snapshots }))
    }

    /// Stops offering the snapshot and removes its clone; its checkpoint
    /// stays (the next incremental backup reads changes since it).
    fn snapshot_delete(&self, export_name: &str, name: &str) -> Result<Value, ControlError> {
        let _one_at_a_time = self.changing.lock().expect("control lock");
        let Some(snapshot) = self.snapshots.remove(export_name, name) else {
            return Err(error(
                ErrorKind::UnknownSnapshot,
                format!("no snapshot of export {export_name:?} at checkpoint {name:?}"),
            ));
        };
        self.catalog.remove(&snapshot.name);
        Ok(snapshot_json(&snapshot))
    }
}

impl Verbs {
    fn admin(&self) -> &super::export_admin::ExportAdmin {
        self.admin.get().expect("the export admin is set before serving")
    }
}

impl Handler for Verbs {
    fn handle(&self, verb: &Verb) -> Result<Value, ControlError> {
        match verb {
            Verb::Status => Ok(self.status()),
            Verb::CheckpointCreate { export, name } => self.create(export, name),
            Verb::CheckpointList { export } => self.list(export),
            Verb::CheckpointDelete { export, name } => self.delete(export, name),
            Verb::SnapshotCreate { export, name } => self.snapshot_create(export, name),
            Verb::SnapshotList { export } => self.snapshot_list(export.as_deref()),
            Verb::SnapshotDelete { export, name } => self.snapshot_delete(export, name),
            Verb::LayerCommit { export } => self.layer_commit(export),
            Verb::Stats => self.stats(),
            Verb::ExportAdd { export } => self.admin().add_from_request(export),
            Verb::ExportRemove { export, force } => self.admin().remove_named(export, *force),
            Verb::ExportList => Ok(self.admin().list()),
            Verb::Reload { force } => self.admin().reload(*force),
        }
    }
}
