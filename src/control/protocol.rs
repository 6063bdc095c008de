//! The control protocol (doc/control.md): one JSON object per line each
//! way. A request names its verb and may carry an `id`, echoed in the
//! reply; a reply says `ok` and carries a `result` or an `error` with a
//! stable `kind` and a message for people.
//!
//! ```text
//! > {"id":1,"verb":"checkpoint-create","export":"disk","name":"mon"}
//! < {"id":1,"ok":true,"result":{"export":"disk","name":"mon","era":1,...}}
//! > {"verb":"checkpoint-delete","export":"disk","name":"nope"}
//! < {"ok":false,"error":{"kind":"unknown-checkpoint","message":"no checkpoint named \"nope\""}}
//! ```
//!
//! Unknown fields are ignored, so requests may grow; new verbs and result
//! fields are added, never changed.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request line accepted, newline included.
pub const LINE_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    #[serde(flatten)]
    pub verb: Verb,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "kebab-case")]
pub enum Verb {
    /// The server, its exports and what each tracks.
    Status,
    CheckpointCreate {
        export: String,
        name: String,
    },
    CheckpointList {
        export: String,
    },
    CheckpointDelete {
        export: String,
        name: String,
    },
    /// A checkpoint and the snapshot export `EXPORT@NAME` taken with it.
    SnapshotCreate {
        export: String,
        name: String,
    },
    /// Every snapshot, or those of one export.
    SnapshotList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        export: Option<String>,
    },
    SnapshotDelete {
        export: String,
        name: String,
    },
    /// Copies the top layer of a layered export into the layer below.
    LayerCommit {
        export: String,
    },
    /// Request counters per export and per worker (doc/metrics.md).
    Stats,
    /// A new export, defined by a table with the keys of a config file's
    /// `[[export]]` (doc/config.md).
    ExportAdd {
        export: Value,
    },
    /// Stop offering an export; its connections finish, or with `force`
    /// are closed as at shutdown.
    ExportRemove {
        export: String,
        #[serde(default)]
        force: bool,
    },
    /// Every export, with where it came from and its state.
    ExportList,
    /// Apply the config file's exports again (as SIGHUP does).
    Reload {
        #[serde(default)]
        force: bool,
    },
}

/// Why a request failed; serialized in kebab-case as the error's `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Not JSON, not an object, an unknown verb or a missing field.
    BadRequest,
    /// A line longer than [`LINE_BYTES_MAX`].
    LineTooLong,
    UnknownExport,
    /// The export does not track changes (no `--track`).
    NotTracked,
    /// Served read-only: its checkpoints cannot change.
    ReadOnly,
    BadName,
    Duplicate,
    UnknownCheckpoint,
    TooMany,
    /// Writes in flight did not drain in time for a checkpoint.
    Busy,
    ShuttingDown,
    /// Too many control clients at once.
    TooManyClients,
    /// The state file could not be written.
    Io,
    UnknownSnapshot,
    /// The export or its file system cannot do what was asked (a snapshot
    /// of a memory export, or on a file system that cannot clone).
    Unsupported,
    /// The export has no layers (`layer-commit` on a plain export).
    NotLayered,
    /// Request counting is off (`--stats off`).
    NotCounting,
    /// The config file could not be read on a reload (nothing changed).
    BadConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Reply {
    pub fn success(id: Option<Value>, result: Value) -> Self {
        Reply { id, ok: true, result: Some(result), error: None }
    }

    pub fn failure(id: Option<Value>, kind: ErrorKind, message: impl Into<String>) -> Self {
        Reply { id, ok: false, result: None, error: Some(ErrorBody { kind, message: message.into() }) }
    }

    /// One line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("replies always serialize");
        line.push('\n');
        line
    }
}

/// A failed verb: what the reply's error says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ControlError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// Decodes one request line (without its newline). A bad line still
/// yields the `id` when one can be read, so the client can match the error.
pub fn parse_request(line: &[u8]) -> Result<Request, Reply> {
    match serde_json::from_slice::<Request>(line) {
        Ok(request) => Ok(request),
        Err(e) => {
            let id = serde_json::from_slice::<Value>(line).ok().and_then(|v| v.get("id").cloned());
            Err(Reply::failure(id, ErrorKind::BadRequest, format!("bad request: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_and_without_ids() {
        let r = parse_request(br#"{"id":7,"verb":"checkpoint-create","export":"d","name":"c"}"#).unwrap();
        assert_eq!(r.id, Some(Value::from(7)));
        assert_eq!(r.verb, Verb::CheckpointCreate { export: "d".into(), name: "c".into() });
        let r = parse_request(br#"{"verb":"status","future":"ignored"}"#).unwrap();
        assert_eq!((r.id, r.verb), (None, Verb::Status));
    }

    #[test]
    fn bad_requests_say_why_and_keep_the_id() {
        for (line, id) in [
            (&br#"{"id":"x","verb":"launch"}"#[..], Some(Value::from("x"))),
            (br#"{"id":3,"verb":"checkpoint-create","export":"d"}"#, Some(Value::from(3))),
            (b"not json", None),
            (b"[1,2]", None),
        ] {
            let reply = parse_request(line).unwrap_err();
            assert_eq!(reply.id, id);
            assert_eq!(reply.error.unwrap().kind, ErrorKind::BadRequest);
        }
    }

    #[test]
    fn replies_are_one_line_with_kebab_case_kinds() {
        let line = Reply::failure(None, ErrorKind::UnknownCheckpoint, "no checkpoint named \"a\"\nsecond").to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.contains(r#""kind":"unknown-checkpoint""#), "{line}");
        let back: Reply = serde_json::from_str(&line).unwrap();
        assert!(!back.ok);
    }
}
