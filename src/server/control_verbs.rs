//! What the control socket's verbs do to a running server.
//!
//! Creating a checkpoint: check the request (so a bad one never stalls
//! writes), freeze the image's mutations on every worker and wait until
//! none is in flight, cut the checkpoint (durable before it returns), thaw,
//! and refresh the catalog so new connections see the new contexts.
//! Checkpoint changes are serialized; status and listing never wait.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::control::Handler;
use crate::control::protocol::{ControlError, ErrorKind, Verb};
use crate::export::{Catalog, Export};
use crate::meta::changes;
use crate::track::{Checkpoint, TrackError, Tracker};

use super::workers::{FreezeError, Workers};

/// How long a checkpoint waits for the writes in flight to finish.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Verbs {
    pub catalog: Arc<Catalog>,
    pub workers: Arc<Workers>,
    pub started: Instant,
    /// One checkpoint change at a time (freezes must not interleave).
    pub changing: Mutex<()>,
}

fn error(kind: ErrorKind, message: impl Into<String>) -> ControlError {
    ControlError::new(kind, message)
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
    fn export(&self, name: &str) -> Result<&Arc<Export>, ControlError> {
        self.catalog
            .exports()
            .iter()
            .find(|e| e.info.name == name)
            .ok_or_else(|| error(ErrorKind::UnknownExport, format!("no export named {name:?}")))
    }

    fn tracker<'a>(&self, export: &'a Export) -> Result<&'a Arc<Tracker>, ControlError> {
        export.image.track.as_ref().ok_or_else(|| {
            error(
                ErrorKind::NotTracked,
                format!("export {:?} does not track changes (start with --track)", export.info.name),
            )
        })
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
                json!({
                    "name": e.info.name,
                    "size": e.info.size,
                    "read_only": e.read_only,
                    "tracking": tracking,
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

    fn create(&self, export_name: &str, name: &str) -> Result<Value, ControlError> {
        let export = self.export(export_name)?;
        let tracker = self.tracker(export)?;
        let _one_at_a_time = self.changing.lock().expect("control lock");
        tracker.check_create(name)?;
        let image = export.image.id;
        self.workers.freeze(image, FREEZE_TIMEOUT).map_err(|e| match e {
            FreezeError::Timeout => error(
                ErrorKind::Busy,
                format!(
                    "writes in flight on {export_name:?} did not finish within {} s; try again",
                    FREEZE_TIMEOUT.as_secs()
                ),
            ),
            FreezeError::ShuttingDown => error(ErrorKind::ShuttingDown, "the server is shutting down"),
        })?;
        let created = tracker.create(name);
        self.workers.thaw(image);
        let checkpoint = created?;
        self.catalog.refresh();
        Ok(checkpoint_json(export_name, &checkpoint))
    }

    fn list(&self, export_name: &str) -> Result<Value, ControlError> {
        let export = self.export(export_name)?;
        let tracker = self.tracker(export)?;
        let checkpoints: Vec<Value> = tracker.checkpoints().iter().map(|c| checkpoint_json(export_name, c)).collect();
        Ok(json!({ "export": export_name, "current_era": tracker.current_era(), "checkpoints": checkpoints }))
    }

    fn delete(&self, export_name: &str, name: &str) -> Result<Value, ControlError> {
        let export = self.export(export_name)?;
        let tracker = self.tracker(export)?;
        let _one_at_a_time = self.changing.lock().expect("control lock");
        tracker.delete(name)?;
        self.catalog.refresh();
        Ok(json!({ "export": export_name, "name": name }))
    }
}

impl Handler for Verbs {
    fn handle(&self, verb: &Verb) -> Result<Value, ControlError> {
        match verb {
            Verb::Status => Ok(self.status()),
            Verb::CheckpointCreate { export, name } => self.create(export, name),
            Verb::CheckpointList { export } => self.list(export),
            Verb::CheckpointDelete { export, name } => self.delete(export, name),
        }
    }
}
