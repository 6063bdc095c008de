//! The config file (`-c/--config FILE`, TOML; doc/config.md): a `[server]`
//! table of global options and one `[[export]]` table per export with
//! everything that is per export. Names in a config may be any UTF-8,
//! including `/`, `:` and `=`, which the command line cannot carry.
//!
//! How it combines with the command line:
//! - a global option given on the command line wins over `[server]`,
//!   which wins over the built-in default;
//! - config exports come first, in file order (the first is the default
//!   export), then command-line exports; names must be unique across both;
//! - an export table's own keys win over the global options for that
//!   export only.
//!
//! Errors name the file, the line and the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::backend::layers::{LayerSpec, Top};
use crate::export::{ExportEntry, ExportOverrides, ExportSpec, Source};
use crate::server::{Definition, ExportSecurity};
use crate::tls::TlsMode;

use super::export_spec::parse_size;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub server: ServerTable,
    #[serde(default)]
    pub export: Vec<Spanned<ExportTable>>,
}

/// `[server]`: the command line's global options, by their long names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerTable {
    pub listen: Option<Vec<String>>,
    pub unix: Option<Vec<PathBuf>>,
    pub threads: Option<u16>,
    pub control: Option<PathBuf>,
    pub metrics: Option<String>,
    pub pidfile: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub buffers: Option<String>,
    pub read_only: Option<bool>,
    pub direct: Option<bool>,
    pub extent_cache: Option<bool>,
    pub track: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub tls: Option<TlsMode>,
    pub tls_certificates: Option<PathBuf>,
    pub tls_verify_peer: Option<bool>,
    pub tls_psk: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub max_connections_per_address: Option<usize>,
    pub log_format: Option<crate::log::Format>,
    pub verbose: Option<bool>,
}

/// `[[export]]`: one export. Exactly one of `path`, `memory`, `layers` and
/// `throwaway` says what it serves.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExportTable {
    pub name: Option<String>,
    pub path: Option<PathBuf>,
    pub memory: Option<String>,
    /// A layered export, highest first: the top, then the read-only layers.
    pub layers: Option<Vec<PathBuf>>,
    /// A throwaway top over these read-only layers (highest first).
    pub throwaway: Option<Vec<PathBuf>>,
    pub description: Option<String>,
    pub read_only: Option<bool>,
    pub direct: Option<bool>,
    pub strict_alignment: Option<bool>,
    pub extent_cache: Option<bool>,
    pub track: Option<bool>,
    #[serde(default)]
    pub checkpoints: Vec<String>,
    #[serde(default)]
    pub tls_only: bool,
    #[serde(default)]
    pub allow: Vec<String>,
    pub max_connections: Option<usize>,
}

/// A config file's exports, ready to open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigExports {
    pub entries: Vec<ExportEntry>,
    pub security: Vec<ExportSecurity>,
}

impl ConfigExports {
    /// Each export with its own security settings (none set: the
    /// defaults), as reloads compare them.
    pub fn definitions(&self) -> Vec<Definition> {
        self.entries
            .iter()
            .map(|entry| {
                let name = entry.spec.name.clone().unwrap_or_default();
                let security = self.security.iter().find(|s| s.name == name).cloned();
                Definition {
                    entry: entry.clone(),
                    security: security.unwrap_or(ExportSecurity { name, ..Default::default() }),
                }
            })
            .collect()
    }
}

/// A `ctl export add` request's table: the keys of an `[[export]]`.
pub fn definition_from_json(table: &serde_json::Value) -> Result<Definition, String> {
    let table: ExportTable = serde_json::from_value(table.clone()).map_err(|e| format!("export table: {e}"))?;
    let (entry, security) = export_entry(&table, &|key| format!("export table: {key}"))?;
    let name = entry.spec.name.clone().unwrap_or_default();
    Ok(Definition { entry, security: security.unwrap_or(ExportSecurity { name, ..Default::default() }) })
}

/// Reads and checks `path`. The message names the file and, where it can,
/// the line and key.
pub fn read(path: &Path) -> Result<(ConfigFile, ConfigExports), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses config text (see [`read`]).
pub fn parse(text: &str) -> Result<(ConfigFile, ConfigExports), String> {
    let config: ConfigFile = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
    let mut exports = ConfigExports::default();
    for (index, table) in config.export.iter().enumerate() {
        let line = line_of(text, table.span().start);
        let at = |key: &str| format!("line {line}: [[export]] #{} {key}", index + 1);
        let (entry, security) = export_entry(table.get_ref(), &at)?;
        if let Some(name) = &entry.spec.name
            && exports.entries.iter().any(|e| e.spec.name.as_ref() == Some(name))
        {
            return Err(format!("{}: export {name:?} is named twice", at("name")));
        }
        exports.entries.push(entry);
        exports.security.extend(security);
    }
    Ok((config, exports))
}

fn export_entry(
    table: &ExportTable,
    at: &dyn Fn(&str) -> String,
) -> Result<(ExportEntry, Option<ExportSecurity>), String> {
    let Some(name) = table.name.clone() else {
        return Err(format!("{}: every export needs a name", at("name")));
    };
    if name.is_empty() {
        return Err(format!("{}: the empty name is the default export's; name it", at("name")));
    }
    if name.len() > crate::proto::wire::STRING_BYTES_MAX {
        return Err(format!("{}: longer than the protocol's 4096 bytes", at("name")));
    }
    let given = [table.path.is_some(), table.memory.is_some(), table.layers.is_some(), table.throwaway.is_some()];
    let source = match given.iter().filter(|&&g| g).count() {
        0 => return Err(format!("{}: give one of path, memory, layers or throwaway", at(&format!("{name:?}")))),
        1 => source(table, at)?,
        _ => {
            return Err(format!("{}: give only one of path, memory, layers and throwaway", at(&format!("{name:?}"))));
        }
    };
    for checkpoint in &table.checkpoints {
        if checkpoint.is_empty() {
            return Err(format!("{}: a checkpoint needs a name", at("checkpoints")));
        }
    }
    let overrides = ExportOverrides {
        read_only: table.read_only,
        direct_io: table.direct,
        extent_cache: table.extent_cache,
        strict_alignment: table.strict_alignment,
        track: table.track.or((!table.checkpoints.is_empty()).then_some(true)),
        description: table.description.clone(),
        checkpoints: table.checkpoints.clone(),
    };
    let security =
        (table.tls_only || !table.allow.is_empty() || table.max_connections.is_some()).then(|| ExportSecurity {
            name: name.clone(),
            tls_only: table.tls_only,
            allow: table.allow.clone(),
            max_connections: table.max_connections,
        });
    Ok((ExportEntry { spec: ExportSpec { name: Some(name), source }, overrides }, security))
}

fn source(table: &ExportTable, at: &dyn Fn(&str) -> String) -> Result<Source, String> {
    if let Some(path) = &table.path {
        return Ok(Source::File(path.clone()));
    }
    if let Some(size) = &table.memory {
        let bytes = parse_size(size).map_err(|e| format!("{}: {e}", at("memory")))?;
        if bytes == 0 {
            return Err(format!("{}: a memory export needs at least one byte", at("memory")));
        }
        return Ok(Source::Memory(bytes));
    }
    let (key, layers, top) = match (&table.layers, &table.throwaway) {
        (Some(layers), _) => ("layers", layers, layers.first().cloned().map(Top::File)),
        (None, Some(layers)) => ("throwaway", layers, Some(Top::Throwaway)),
        (None, None) => unreachable!("one source key was counted"),
    };
    let lowers: Vec<PathBuf> = if key == "layers" { layers.iter().skip(1).cloned().collect() } else { layers.clone() };
    let (Some(top), false) = (top, lowers.is_empty()) else {
        let need = if key == "layers" { "a top and at least one lower layer" } else { "at least one layer" };
        return Err(format!("{}: needs {need}", at(key)));
    };
    if lowers.len() > crate::backend::layers::LOWER_LAYERS_MAX {
        return Err(format!("{}: at most {} lower layers", at(key), crate::backend::layers::LOWER_LAYERS_MAX));
    }
    Ok(Source::Layers(LayerSpec { top, lowers }))
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// toml's message, on one line: "line N, column M: what".
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let what = error.message().trim_end_matches('\n');
    match error.span() {
        Some(span) => {
            let line = line_of(text, span.start);
            let column = span.start - text[..span.start.min(text.len())].rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {what}")
        }
        None => what.to_owned(),
    }
}

impl super::Cli {
    /// Fills the global options the command line left at their defaults
    /// with the config's `[server]` values; `given` says which options the
    /// command line set.
    pub fn apply_config(&mut self, server: &ServerTable, given: &dyn Fn(&str) -> bool) -> Result<(), String> {
        if let Some(threads) = server.threads
            && !(1..=1024).contains(&threads)
        {
            return Err("[server] threads: must be between 1 and 1024".into());
        }
        macro_rules! take {
            ($id:literal, $field:ident, $value:expr) => {
                if !given($id)
                    && let Some(value) = $value
                {
                    self.$field = value;
                }
            };
        }
        take!("listen", listen, server.listen.clone());
        take!("unix", unix, server.unix.clone());
        take!("threads", threads, server.threads.map(Some));
        take!("control", control, server.control.clone().map(Some));
        take!("metrics", metrics, server.metrics.clone().map(Some));
        take!("pidfile", pidfile, server.pidfile.clone().map(Some));
        take!("user", user, server.user.clone().map(Some));
        take!("group", group, server.group.clone().map(Some));
        take!("read_only", read_only, server.read_only);
        take!("no_direct", no_direct, server.direct.map(|direct| !direct));
        take!("extent_cache", extent_cache, server.extent_cache);
        take!("track", track, server.track);
        take!("state_dir", state_dir, server.state_dir.clone().map(Some));
        take!("tls", tls, server.tls.map(Some));
        take!("tls_certificates", tls_certificates, server.tls_certificates.clone().map(Some));
        take!("tls_verify_peer", tls_verify_peer, server.tls_verify_peer);
        take!("tls_psk", tls_psk, server.tls_psk.clone().map(Some));
        take!("max_connections", max_connections, server.max_connections.map(|n| vec![n.to_string()]));
        take!("max_connections_per_address", max_connections_per_address, server.max_connections_per_address.map(Some));
        take!("log_format", log_format, server.log_format);
        take!("verbose", verbose, server.verbose);
        if !given("buffers")
            && let Some(text) = &server.buffers
        {
            self.buffers = Some(super::parse_buffer(text).map_err(|e| format!("[server] buffers: {e}"))?);
        }
        if self.tls_certificates.is_some() && self.tls_psk.is_some() {
            return Err("[server]: tls-certificates and tls-psk exclude each other".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each bad config and the exact message it gets.
    #[test]
    fn bad_configs_get_exact_messages() {
        let cases: &[(&str, &str)] = &[
            ("[server]\nthread = 2\n", "line 2, column 1: unknown field `thread`, expected one of"),
            ("[server]\nthreads = \"two\"\n", "line 2, column 11: invalid type: string \"two\", expected u16"),
            ("[server\n", "line 1, column 8: invalid table header\nexpected `.`, `]`"),
            ("[[export]]\npath = \"/x\"\n", "line 1: [[export]] #1 name: every export needs a name"),
            (
                "[[export]]\nname = \"\"\nmemory = \"1G\"\n",
                "line 1: [[export]] #1 name: the empty name is the default export's; name it",
            ),
            (
                "[[export]]\nname = \"a\"\n",
                "line 1: [[export]] #1 \"a\": give one of path, memory, layers or throwaway",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"/x\"\nmemory = \"1G\"\n",
                "line 1: [[export]] #1 \"a\": give only one of path, memory, layers and throwaway",
            ),
            (
                "[[export]]\nname = \"a\"\nmemory = \"1Q\"\n",
                "line 1: [[export]] #1 memory: bad size \"1Q\" (use e.g. 512M, 1G, 4T)",
            ),
            (
                "[[export]]\nname = \"a\"\nmemory = \"0\"\n",
                "line 1: [[export]] #1 memory: a memory export needs at least one byte",
            ),
            (
                "[[export]]\nname = \"a\"\nlayers = [\"/top\"]\n",
                "line 1: [[export]] #1 layers: needs a top and at least one lower layer",
            ),
            ("[[export]]\nname = \"a\"\nthrowaway = []\n", "line 1: [[export]] #1 throwaway: needs at least one layer"),
            (
                "[[export]]\nname = \"a\"\nmemory = \"1M\"\n\n[[export]]\nname = \"a\"\nmemory = \"1M\"\n",
                "line 5: [[export]] #2 name: export \"a\" is named twice",
            ),
            (
                "[[export]]\nname = \"a\"\nmemory = \"1M\"\nreadonly = true\n",
                "line 4, column 1: unknown field `readonly`, expected one of",
            ),
            (
                "[[export]]\nname = \"a\"\nmemory = \"1M\"\ncheckpoints = [\"\"]\n",
                "line 1: [[export]] #1 checkpoints: a checkpoint needs a name",
            ),
            (
                "[server]\ntls = \"maybe\"\n",
                "line 2, column 7: unknown variant `maybe`, expected one of `off`, `on`, `require`",
            ),
        ];
        for (config, expected) in cases {
            let message = parse(config).expect_err(config);
            assert!(message.starts_with(expected), "config:\n{config}\ngot:      {message}\nexpected: {expected}");
        }
    }

    /// Small good configs and what each yields: (text, export names, a
    /// check on the result).
    #[test]
    fn good_configs_parse_to_what_they_say() {
        type Check = fn(&ConfigFile, &ConfigExports) -> bool;
        let cases: &[(&str, &[&str], Check)] = &[
            ("", &[], |c, _| c.server.threads.is_none()),
            ("[server]\n", &[], |c, _| c.server.listen.is_none()),
            ("[server]\nunix = [\"/run/a.sock\"]\nlisten = []\n", &[], |c, _| c.server.listen == Some(vec![])),
            ("[[export]]\nname = \"é/ü:1\"\nmemory = \"4K\"\n", &["é/ü:1"], |_, e| {
                e.entries[0].spec.source == Source::Memory(4096)
            }),
            ("[[export]]\nname = \"a b\"\npath = \"/x y\"\nread-only = false\n", &["a b"], |_, e| {
                e.entries[0].overrides.read_only == Some(false)
            }),
            ("[[export]]\nname = \"t\"\nthrowaway = [\"/g\"]\ntls-only = true\n", &["t"], |_, e| {
                e.security[0].tls_only && e.security[0].allow.is_empty()
            }),
            ("[server]\ntls = \"require\"\nlog-format = \"json\"\n", &[], |c, _| {
                c.server.tls == Some(TlsMode::Require) && c.server.log_format == Some(crate::log::Format::Json)
            }),
        ];
        for (text, names, check) in cases {
            let (config, exports) = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let got: Vec<&str> = exports.entries.iter().filter_map(|e| e.spec.name.as_deref()).collect();
            assert_eq!(&got, names, "{text:?}");
            assert!(check(&config, &exports), "{text:?}");
        }
    }

    #[test]
    fn a_good_config_gives_every_export_its_own_options() {
        let text = r#"
# A comment.
[server]
listen = ["127.0.0.1:0"]
threads = 3
track = false

[[export]]
name = "vm/disk:1=a"
path = "/srv/disk.raw"
description = "the VM's disk"
read-only = true
direct = false
extent-cache = false
checkpoints = ["mon"]
tls-only = true
allow = ["addr:10.0.0.0/8"]
max-connections = 2

[[export]]
name = "scratch"
memory = "64M"

[[export]]
name = "vm2"
layers = ["/top.raw", "/golden.raw"]

[[export]]
name = "test"
throwaway = ["/golden.raw"]
"#;
        let (config, exports) = parse(text).unwrap();
        assert_eq!(config.server.threads, Some(3));
        let names: Vec<_> = exports.entries.iter().map(|e| e.spec.name.clone().unwrap()).collect();
        assert_eq!(names, ["vm/disk:1=a", "scratch", "vm2", "test"]);
        let disk = &exports.entries[0];
        assert_eq!(disk.spec.source, Source::File("/srv/disk.raw".into()));
        assert_eq!(
            disk.overrides,
            ExportOverrides {
                read_only: Some(true),
                direct_io: Some(false),
                extent_cache: Some(false),
                strict_alignment: None,
                track: Some(true),
                description: Some("the VM's disk".into()),
                checkpoints: vec!["mon".into()],
            },
            "checkpoints imply tracking"
        );
        assert_eq!(exports.entries[1].spec.source, Source::Memory(64 << 20));
        assert_eq!(exports.entries[1].overrides, ExportOverrides::default());
        assert_eq!(
            exports.entries[2].spec.source,
            Source::Layers(LayerSpec { top: Top::File("/top.raw".into()), lowers: vec!["/golden.raw".into()] })
        );
        assert_eq!(
            exports.entries[3].spec.source,
            Source::Layers(LayerSpec { top: Top::Throwaway, lowers: vec!["/golden.raw".into()] })
        );
        assert_eq!(
            exports.security,
            vec![ExportSecurity {
                name: "vm/disk:1=a".into(),
                tls_only: true,
                allow: vec!["addr:10.0.0.0/8".into()],
                max_connections: Some(2),
            }]
        );
        assert!(parse("").unwrap().1.entries.is_empty(), "an empty config is valid");
    }

    #[test]
    fn the_example_config_in_doc_parses() {
        let text = include_str!("../../doc/ringnbd.example.toml");
        let (config, exports) = parse(text).expect("doc/ringnbd.example.toml");
        assert_eq!(config.server.tls, Some(TlsMode::On));
        assert_eq!(exports.entries.len(), 5);
        assert_eq!(exports.entries[0].spec.name.as_deref(), Some("vm/web-01:disk0"));
        assert_eq!(exports.security.len(), 2);
    }

    #[test]
    fn the_command_line_wins_over_the_server_table() {
        use clap::{CommandFactory, FromArgMatches};
        let (config, _) =
            parse("[server]\nthreads = 3\nread-only = true\nlisten = [\"127.0.0.1:1\"]\nbuffers = \"128M\"\n").unwrap();
        let matches = super::super::Cli::command().get_matches_from(["ringnbd", "--threads", "5"]);
        let mut cli = super::super::Cli::from_arg_matches(&matches).unwrap();
        let given = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        cli.apply_config(&config.server, &given).unwrap();
        assert_eq!(cli.threads, Some(5), "given on the command line");
        assert!(cli.read_only, "taken from [server]");
        assert_eq!(cli.listen, ["127.0.0.1:1"]);
        assert_eq!(cli.buffers, Some(128 << 20));
        let (bad, _) = parse("[server]\nbuffers = \"1M\"\n").unwrap();
        let mut cli = super::super::Cli::from_arg_matches(&matches).unwrap();
        assert_eq!(cli.apply_config(&bad.server, &given).unwrap_err(), "[server] buffers: must be between 16M and 1T");
    }
}
