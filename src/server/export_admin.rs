//! Exports while serving: added (`ctl export add`), removed (`ctl export
//! remove [--force]`), listed, and the config file's exports applied
//! again (`ctl reload`, SIGHUP). doc/config.md has the rules; in short:
//!
//! - a new export is opened and offered at once (a file another export
//!   serves is shared through its image, like at start);
//! - a removed export leaves the offer at once; its connections finish
//!   (with `--force` they are closed as at shutdown: no new requests, the
//!   ones in flight answered); once the last has gone and nothing else
//!   refers to its image, the image is flushed, its change tracking shut
//!   down cleanly, its file closed, and its id given back;
//! - a reload compares each config export with what it was: unchanged
//!   ones are left alone; one whose description, TLS-only flag, allow-list
//!   or connection limit changed is swapped for a new export of the same
//!   image (new clients see the change, connected ones keep going); one
//!   whose storage changed is removed, and its replacement is offered once
//!   the old one's connections have gone, so one file is never open twice;
//!   new checkpoints in a table are created where absent.
//!
//! Exports named on the command line and added through the control socket
//! are not the config file's: a reload leaves them alone.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::control::protocol::{ControlError, ErrorKind};
use crate::export::{self, Catalog, Export, ExportEntry, ExportOptions, Image};
use crate::net::access::{ConnectionLimits, Rule, SharedPolicy};
use crate::tls::TlsMode;

use super::finish::finish_image;
use super::security::{ExportSecurity, SecurityConfig};
use super::workers::Workers;

/// One export as a config table (or a control request) defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub entry: ExportEntry,
    pub security: ExportSecurity,
}

impl Definition {
    pub fn name(&self) -> &str {
        &self.security.name
    }

    /// Whether `other` serves the same storage the same way: it may differ
    /// only in what an export over the same image can change.
    fn same_storage(&self, other: &Definition) -> bool {
        let (mut a, mut b) = (self.entry.clone(), other.entry.clone());
        for entry in [&mut a, &mut b] {
            entry.overrides.description = None;
            entry.overrides.checkpoints.clear();
        }
        a == b
    }
}

/// Reads the config file's exports afresh (a reload).
pub type ReadConfig = dyn Fn() -> Result<Vec<Definition>, String> + Send + Sync;
/// Turns a control request's export table into a definition.
pub type ParseDefinition = dyn Fn(&Value) -> Result<Definition, String> + Send + Sync;

/// Where definitions come from: the config file (for reloads, with what it
/// said at start) and the parser of `export-add` requests.
#[derive(Clone, Default)]
pub struct DefinitionSource {
    pub config: Option<(std::path::PathBuf, Arc<ReadConfig>)>,
    pub at_start: Vec<Definition>,
    pub parse: Option<Arc<ParseDefinition>>,
}

impl std::fmt::Debug for DefinitionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefinitionSource")
            .field("config", &self.config.as_ref().map(|(path, _)| path))
            .field("at_start", &self.at_start)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    CommandLine,
    Config,
    Control,
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Origin::CommandLine => "command-line",
            Origin::Config => "config",
            Origin::Control => "control",
        }
    }
}

struct Managed {
    export: Arc<Export>,
    origin: Origin,
    /// None for command-line exports (their options are the global ones).
    definition: Option<Definition>,
}

/// A removed export whose connections or references have not all gone.
struct Retiring {
    export: Arc<Export>,
    since: Instant,
    forced: bool,
    /// Swapped for a new export of the same image (a reload that changed
    /// only what the export says and who may use it): its connections
    /// keep it, and the image goes on.
    replaced: bool,
    /// When its connections had all gone: from then on only references
    /// (a handshake that began before the removal) keep the image open,
    /// and after [`SETTLE_MAX`] it is finished regardless.
    drained_at: Option<Instant>,
}

/// A replacement offered once the export it replaces has retired.
struct Waiting {
    definition: Definition,
    origin: Origin,
    /// Weak, so waiting does not keep the old export referenced.
    behind: std::sync::Weak<Export>,
}

#[derive(Default)]
struct State {
    managed: Vec<Managed>,
    retiring: Vec<Retiring>,
    waiting: Vec<Waiting>,
}

/// How long a drained export's image may stay referenced (by handshakes
/// that began before its removal, which end within the handshake timeout)
/// before it is finished anyway.
const SETTLE_MAX: Duration = Duration::from_secs(15);
/// How often the reaper looks at retiring exports while there are any
/// (with none it sleeps until one retires: an idle server does not wake).
pub const REAP_PERIOD: Duration = Duration::from_millis(50);
/// Commit tokens carry an image id in 16 bits.
const IMAGE_IDS_MAX: usize = u16::MAX as usize;

pub struct ExportAdmin {
    pub catalog: Arc<Catalog>,
    pub workers: Arc<Workers>,
    pub access: Arc<SharedPolicy>,
    pub limits: Arc<ConnectionLimits>,
    pub security: SecurityConfig,
    pub options: ExportOptions,
    pub source: DefinitionSource,
    /// Snapshot export names (`EXPORT@NAME`) are the snapshot verbs'.
    pub snapshots: Arc<export::snapshot::Snapshots>,
    state: Mutex<State>,
    /// Signalled, under `state`'s lock, when an export starts retiring and
    /// at shutdown (see [`ExportAdmin::run_reaper`]).
    reaper_wake: std::sync::Condvar,
}

fn error(kind: ErrorKind, message: impl Into<String>) -> ControlError {
    ControlError::new(kind, message)
}

impl ExportAdmin {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        catalog: Arc<Catalog>,
        workers: Arc<Workers>,
        access: Arc<SharedPolicy>,
        limits: Arc<ConnectionLimits>,
        security: SecurityConfig,
        options: ExportOptions,
        source: DefinitionSource,
        snapshots: Arc<export::snapshot::Snapshots>,
    ) -> Self {
        let managed = catalog
            .exports()
            .iter()
            .map(|export| {
                let definition = source.at_start.iter().find(|d| d.name() == export.info.name).cloned();
                let origin = if definition.is_some() { Origin::Config } else { Origin::CommandLine };
                Managed { export: Arc::clone(export), origin, definition }
            })
            .collect();
        let state = Mutex::new(State { managed, ..Default::default() });
        let reaper_wake = std::sync::Condvar::new();
        Self { catalog, workers, access, limits, security, options, source, snapshots, state, reaper_wake }
    }

    /// The reaper thread's loop: while exports are retiring, finishes them
    /// every [`REAP_PERIOD`]; otherwise sleeps until one retires, so an
    /// idle server (and every short connection's CPU count) pays nothing
    /// for it. Returns once `shutdown` is set and [`Self::wake_reaper`]
    /// has been called.
    pub fn run_reaper(&self, shutdown: &std::sync::atomic::AtomicBool) {
        use std::sync::atomic::Ordering;
        loop {
            let mut state = self.state();
            // Checked under the lock that `wake_reaper` takes, so a wake
            // between the check and the wait is never lost.
            while state.retiring.is_empty() && state.waiting.is_empty() && !shutdown.load(Ordering::Acquire) {
                state = self.reaper_wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            drop(state);
            if shutdown.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(REAP_PERIOD);
            self.reap();
        }
    }

    /// Wakes the reaper to look again (an export retired, or shutdown).
    pub fn wake_reaper(&self) {
        let _state = self.state();
        self.reaper_wake.notify_all();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `export-add`: a new export from a control request's table.
    pub fn add_from_request(&self, table: &Value) -> Result<Value, ControlError> {
        let Some(parse) = &self.source.parse else {
            return Err(error(ErrorKind::Unsupported, "this server cannot add exports"));
        };
        let definition = parse(table).map_err(|message| error(ErrorKind::BadRequest, message))?;
        let mut state = self.state();
        let export = self.add(&mut state, &definition, Origin::Control)?;
        Ok(export_json(&export, json!(Origin::Control.name()), "serving"))
    }

    /// Checks, opens and offers one export.
    fn add(&self, state: &mut State, definition: &Definition, origin: Origin) -> Result<Arc<Export>, ControlError> {
        let name = definition.name();
        if self.catalog.find(name).is_some() || state.waiting.iter().any(|w| w.definition.name() == name) {
            return Err(error(ErrorKind::Duplicate, format!("an export named {name:?} exists")));
        }
        let rules = self.check_security(&definition.security)?;
        let id = self.catalog.new_image_id();
        if id >= IMAGE_IDS_MAX {
            self.catalog.release_image_id(id);
            return Err(error(ErrorKind::TooMany, format!("at most {IMAGE_IDS_MAX} images at once")));
        }
        let opened = self.open(state, definition, id);
        let export = match opened {
            Ok(export) => export,
            Err(e) => {
                self.catalog.release_image_id(id);
                return Err(e);
            }
        };
        if export.image.id != id {
            // Shared with an export of the same file.
            self.catalog.release_image_id(id);
        }
        self.access.set_export(name, rules);
        self.limits.set_export_max(name, definition.security.max_connections);
        let export = Arc::new(export);
        if self.catalog.add(Arc::clone(&export)).is_err() {
            // A snapshot export of that name appeared meanwhile.
            return Err(error(ErrorKind::Duplicate, format!("an export named {name:?} exists")));
        }
        state.managed.push(Managed { export: Arc::clone(&export), origin, definition: Some(definition.clone()) });
        crate::note!("export {name:?} added ({})", origin.name());
        Ok(export)
    }

    /// The export's own rules, checked against the credentials in use.
    fn check_security(&self, security: &ExportSecurity) -> Result<Vec<Rule>, ControlError> {
        if security.tls_only && self.security.tls_mode == TlsMode::Off {
            return Err(error(ErrorKind::BadRequest, format!("export {:?}: tls-only needs TLS", security.name)));
        }
        security
            .allow
            .iter()
            .map(|text| self.security.rule(text, &format!("export {:?}: allow {text:?}", security.name)))
            .collect::<Result<_, _>>()
            .map_err(|message| error(ErrorKind::BadRequest, message))
    }

    /// Opens the export's storage, sharing the image of an offered export
    /// of the same file; a file only a retiring export still holds is busy.
    fn open(&self, state: &State, definition: &Definition, id: usize) -> Result<Export, ControlError> {
        let offered = self.catalog.exports();
        let shared = |identity: &crate::backend::FileIdentity| {
            offered
                .iter()
                .map(|e| &e.image)
                .find(|image| export::file_identity(image) == Some(*identity))
                .map(Arc::clone)
        };
        let retiring_on = |identity: &crate::backend::FileIdentity| {
            state.retiring.iter().find(|r| export::file_identity(&r.export.image) == Some(*identity))
        };
        // A file's identity is only known once it is open: check it first
        // for the busy case, so the image of a retiring export is never
        // opened a second time.
        if let export::Source::File(path) = &definition.entry.spec.source
            && let Ok(identity) = crate::backend::FileIdentity::of_path(path)
            && shared(&identity).is_none()
            && let Some(retiring) = retiring_on(&identity)
        {
            return Err(error(
                ErrorKind::Busy,
                format!(
                    "{} is still served by the removed export {:?} ({} connection(s) finishing); \
                     try again when they have closed, or remove it with --force",
                    path.display(),
                    retiring.export.info.name,
                    retiring.export.usage.connections()
                ),
            ));
        }
        let mut export = export::open_entry(&definition.entry, &self.options, 0, &shared, id)
            .map_err(|e| error(ErrorKind::Io, format!("export {:?}: {e}", definition.name())))?;
        self.apply_own(&mut export, definition)?;
        Ok(export)
    }

    /// What the definition sets on the export itself: description,
    /// TLS-only, and checkpoints created where absent.
    fn apply_own(&self, export: &mut Export, definition: &Definition) -> Result<(), ControlError> {
        export::apply_descriptions(std::slice::from_mut(export), &self.options.descriptions);
        if let Some(text) = &definition.entry.overrides.description {
            export.info.description = text.clone();
        }
        export.info.tls_only = definition.security.tls_only;
        for name in &definition.entry.overrides.checkpoints {
            export::create_start_checkpoint(export, name, name)
                .map_err(|e| error(ErrorKind::Io, format!("export {:?}: {e}", definition.name())))?;
        }
        Ok(())
    }

    /// `export-remove`.
    pub fn remove_named(&self, name: &str, force: bool) -> Result<Value, ControlError> {
        let mut state = self.state();
        let export = self.remove(&mut state, name, force)?;
        let connections = export.usage.connections();
        drop((state, export));
        // An export nobody was using is finished before the reply, so the
        // same file can be added again at once.
        self.reap();
        Ok(json!({ "export": name, "connections": connections, "forced": force }))
    }

    fn remove(&self, state: &mut State, name: &str, force: bool) -> Result<Arc<Export>, ControlError> {
        let Some(position) = state.managed.iter().position(|m| m.export.info.name == name) else {
            if self.snapshots.list().iter().any(|s| s.name == name) {
                return Err(error(
                    ErrorKind::Unsupported,
                    format!("{name:?} is a snapshot export: use ctl snapshot delete"),
                ));
            }
            return Err(error(ErrorKind::UnknownExport, format!("no export named {name:?}")));
        };
        let held: Vec<String> =
            self.snapshots.list().into_iter().filter(|s| s.export == name).map(|s| s.name).collect();
        if !held.is_empty() {
            return Err(error(
                ErrorKind::Busy,
                format!("export {name:?} has snapshot exports ({}); delete them first", held.join(", ")),
            ));
        }
        let managed = state.managed.remove(position);
        self.catalog.remove(name);
        managed.export.usage.remove();
        if force {
            managed.export.usage.force();
            self.workers.close_export(&managed.export);
        }
        crate::note!(
            "export {name:?} removed{}; {} connection(s) finishing",
            if force { " (--force)" } else { "" },
            managed.export.usage.connections()
        );
        state.retiring.push(Retiring {
            export: Arc::clone(&managed.export),
            since: Instant::now(),
            forced: force,
            replaced: false,
            drained_at: None,
        });
        self.reaper_wake.notify_all();
        Ok(managed.export)
    }

    /// `export-list`: what is served, and what is leaving or waiting.
    pub fn list(&self) -> Value {
        let state = self.state();
        let mut exports: Vec<Value> =
            state.managed.iter().map(|m| export_json(&m.export, json!(m.origin.name()), "serving")).collect();
        for snapshot in self.snapshots.list() {
            if let Some(export) = self.catalog.find(&snapshot.name) {
                exports.push(export_json(&export, json!("snapshot"), "serving"));
            }
        }
        for r in &state.retiring {
            let mut entry = export_json(&r.export, Value::Null, if r.replaced { "replaced" } else { "removing" });
            entry["removed_s_ago"] = json!(r.since.elapsed().as_secs_f64());
            entry["forced"] = json!(r.forced);
            exports.push(entry);
        }
        for w in &state.waiting {
            exports.push(json!({
                "name": w.definition.name(),
                "origin": w.origin.name(),
                "state": "waiting",
                "waiting_for_connections": w.behind.upgrade().map_or(0, |old| old.usage.connections()),
            }));
        }
        json!({ "exports": exports })
    }

    /// `reload` and SIGHUP: the config file's exports applied again.
    pub fn reload(&self, force: bool) -> Result<Value, ControlError> {
        let Some((path, read)) = &self.source.config else {
            return Err(error(ErrorKind::Unsupported, "the server was started without --config: nothing to reload"));
        };
        let wanted = read().map_err(|message| error(ErrorKind::BadConfig, message))?;
        let mut state = self.state();
        let mut report = Report::default();
        let config_names: Vec<String> =
            state.managed.iter().filter(|m| m.origin == Origin::Config).map(|m| m.export.info.name.clone()).collect();
        for name in config_names.iter().filter(|n| !wanted.iter().any(|d| d.name() == n.as_str())) {
            match self.remove(&mut state, name, force) {
                Ok(_) => report.removed.push(name.clone()),
                Err(e) => report.failed(name, e),
            }
        }
        state.waiting.retain(|w| {
            let still = wanted.iter().any(|d| d.name() == w.definition.name());
            if !still {
                report.removed.push(w.definition.name().to_owned());
            }
            still
        });
        for definition in &wanted {
            let name = definition.name().to_owned();
            if let Some(waiting) = state.waiting.iter_mut().find(|w| w.definition.name() == name) {
                if waiting.definition != *definition {
                    waiting.definition = definition.clone();
                    report.changed.push(name);
                } else {
                    report.unchanged.push(name);
                }
                continue;
            }
            let current = state.managed.iter().position(|m| m.export.info.name == name);
            let outcome = match current {
                None => self.add(&mut state, definition, Origin::Config).map(|_| &mut report.added),
                Some(i) if state.managed[i].origin != Origin::Config => Err(error(
                    ErrorKind::Duplicate,
                    format!(
                        "an export named {name:?} came from the {}; the config file cannot change it",
                        state.managed[i].origin.name()
                    ),
                )),
                Some(i) if state.managed[i].definition.as_ref() == Some(definition) => Ok(&mut report.unchanged),
                Some(i) => self.change(&mut state, i, definition, force).map(|waits| match waits {
                    true => &mut report.waiting,
                    false => &mut report.changed,
                }),
            };
            match outcome {
                Ok(list) => list.push(name),
                Err(e) => report.failed(&name, e),
            }
        }
        drop(state);
        self.reap();
        let summary = report.json();
        crate::note!("reloaded {}: {}", path.display(), report.summary());
        Ok(summary)
    }

    /// A config export whose definition changed. Returns whether its
    /// replacement waits for the old one's connections.
    fn change(
        &self,
        state: &mut State,
        index: usize,
        definition: &Definition,
        force: bool,
    ) -> Result<bool, ControlError> {
        let old = Arc::clone(&state.managed[index].export);
        let was = state.managed[index].definition.clone().expect("config exports have definitions");
        if was.same_storage(definition) {
            let rules = self.check_security(&definition.security)?;
            let mut export = Export {
                info: old.info.clone(),
                image: Arc::clone(&old.image),
                read_only: old.read_only,
                usage: Default::default(),
            };
            export.info.description = export::default_description(&old.image, old.read_only);
            self.apply_own(&mut export, definition)?;
            self.access.set_export(definition.name(), rules);
            self.limits.set_export_max(definition.name(), definition.security.max_connections);
            let export = Arc::new(export);
            self.catalog.replace(Arc::clone(&export));
            state.managed[index] = Managed { export, origin: Origin::Config, definition: Some(definition.clone()) };
            // Its connections keep the old export; the image is not
            // finished while the new one serves it.
            state.retiring.push(Retiring {
                export: old,
                since: Instant::now(),
                forced: false,
                replaced: true,
                drained_at: None,
            });
            self.reaper_wake.notify_all();
            return Ok(false);
        }
        self.remove(state, definition.name(), force)?;
        let behind = Arc::downgrade(&old);
        drop(old);
        state.waiting.push(Waiting { definition: definition.clone(), origin: Origin::Config, behind });
        self.reaper_wake.notify_all();
        Ok(true)
    }

    /// Finishes retiring exports whose connections and references are
    /// gone, then offers the replacements that waited for them. Called
    /// every [`REAP_PERIOD`] and after each removal.
    pub fn reap(&self) {
        let mut state = self.state();
        let now = Instant::now();
        let mut finished = Vec::new();
        let mut index = 0;
        while index < state.retiring.len() {
            let retiring = &mut state.retiring[index];
            if retiring.export.usage.connections() > 0 {
                index += 1;
                continue;
            }
            let drained_at = *retiring.drained_at.get_or_insert(now);
            // Ours is the only reference left (no handshake that began
            // before the removal still holds an offer with it), or such
            // references have had their time.
            let settled = Arc::strong_count(&retiring.export) == 1;
            if !settled && now.duration_since(drained_at) < SETTLE_MAX {
                index += 1;
                continue;
            }
            finished.push(state.retiring.remove(index).export);
        }
        for export in finished {
            let name = export.info.name.clone();
            let image = Arc::clone(&export.image);
            let mut in_use = state.managed.iter().map(|m| &m.export).chain(state.retiring.iter().map(|r| &r.export));
            let shared = in_use.any(|e| Arc::ptr_eq(&e.image, &image));
            if !shared {
                finish_image(&image, opened_writable(&image));
                self.catalog.release_image_id(image.id);
            }
            if !shared {
                crate::note!("export {name:?} is gone: its last connection closed and its image is closed");
            }
            drop((export, image));
        }
        self.add_waiting(&mut state);
    }

    /// Offers the replacements whose old export is gone. One whose file a
    /// retiring export still holds (an older version of it, swapped out by
    /// an earlier reload, may keep connections) waits for the next turn.
    fn add_waiting(&self, state: &mut State) {
        let (ready, still): (Vec<Waiting>, Vec<Waiting>) =
            std::mem::take(&mut state.waiting).into_iter().partition(|w| w.behind.strong_count() == 0);
        state.waiting = still;
        for waiting in ready {
            match self.add(state, &waiting.definition, waiting.origin) {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::Busy => state.waiting.push(waiting),
                Err(e) => crate::note!(
                    "export {:?}: its replacement could not be added: {}",
                    waiting.definition.name(),
                    e.message
                ),
            }
        }
    }

    /// Every image the server serves or still finishes, each once (for
    /// the final flush at shutdown); snapshot exports are not included.
    pub fn images(&self) -> Vec<Arc<Image>> {
        let state = self.state();
        let mut images: Vec<Arc<Image>> = Vec::new();
        for export in state.managed.iter().map(|m| &m.export).chain(state.retiring.iter().map(|r| &r.export)) {
            if !images.iter().any(|i| Arc::ptr_eq(i, &export.image)) {
                images.push(Arc::clone(&export.image));
            }
        }
        images
    }

    /// Forgets everything at shutdown (the images are finished by the
    /// caller from [`ExportAdmin::images`]).
    pub fn clear(&self) {
        *self.state() = State::default();
    }
}

/// Whether the image's storage was opened for writing (so its final flush
/// and clean-shutdown record are due).
pub fn opened_writable(image: &Image) -> bool {
    match &image.backend {
        crate::backend::Backend::File(file) => !file.is_read_only(),
        crate::backend::Backend::Layered(layers) => !layers.top.is_read_only(),
        _ => false,
    }
}

/// An export as listed; `origin` is where it came from (null once removed).
fn export_json(export: &Export, origin: Value, state: &str) -> Value {
    json!({
        "name": export.info.name,
        "origin": origin,
        "state": state,
        "size": export.info.size,
        "read_only": export.read_only,
        "tls_only": export.info.tls_only,
        "description": export.info.description,
        "connections": export.usage.connections(),
        "tracked": export.image.track.is_some(),
    })
}

/// What a reload did, by export name.
#[derive(Default)]
struct Report {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
    /// Changed storage: offered once the old export's connections close.
    waiting: Vec<String>,
    unchanged: Vec<String>,
    errors: Vec<Value>,
}

impl Report {
    fn failed(&mut self, name: &str, e: ControlError) {
        crate::note!("reload: export {name:?}: {}", e.message);
        self.errors.push(json!({ "export": name, "kind": e.kind, "message": e.message }));
    }

    fn json(&self) -> Value {
        json!({
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "waiting": self.waiting,
            "unchanged": self.unchanged,
            "errors": self.errors,
        })
    }

    fn summary(&self) -> String {
        format!(
            "{} added, {} removed, {} changed, {} waiting for connections to close, {} unchanged, {} error(s)",
            self.added.len(),
            self.removed.len(),
            self.changed.len(),
            self.waiting.len(),
            self.unchanged.len(),
            self.errors.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{ExportOverrides, ExportSpec};

    fn definition(description: Option<&str>, read_only: Option<bool>, checkpoints: &[&str]) -> Definition {
        let spec: ExportSpec = "d=/srv/d.img".parse().unwrap();
        let overrides = ExportOverrides {
            description: description.map(String::from),
            read_only,
            checkpoints: checkpoints.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        Definition {
            entry: ExportEntry { spec, overrides },
            security: ExportSecurity { name: "d".into(), ..Default::default() },
        }
    }

    #[test]
    fn what_an_export_says_and_who_may_use_it_is_not_its_storage() {
        let base = definition(Some("one"), None, &[]);
        assert!(base.same_storage(&definition(Some("two"), None, &["c1"])));
        let mut stricter = definition(None, None, &[]);
        stricter.security.allow.push("addr:10.0.0.0/8".into());
        stricter.security.max_connections = Some(2);
        assert!(base.same_storage(&stricter));
        assert!(!base.same_storage(&definition(Some("one"), Some(true), &[])), "read-only reopens the file");
        let mut moved = definition(Some("one"), None, &[]);
        moved.entry.spec = "d=/srv/other.img".parse().unwrap();
        assert!(!base.same_storage(&moved));
    }
}
