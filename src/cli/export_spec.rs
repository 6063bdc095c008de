//! Export arguments from the command line: `[NAME=]PATH`,
//! `[NAME=]memory:SIZE`, `[NAME=]layers:TOP,LOWER[,LOWER...]` and
//! `[NAME=]throwaway:IMAGE[,LOWER...]` (doc/layers.md), parsed but not yet
//! opened.

use thiserror::Error;

use std::path::PathBuf;

use crate::backend::layers::{LOWER_LAYERS_MAX, LayerSpec, Top};
use crate::backend::memory::MEMORY_EXPORT_BYTES_MAX;
use crate::export::{ExportSpec, Source};
use crate::proto::wire::STRING_BYTES_MAX;

/// Why an `EXPORT` argument (or a size) is not usable. Each says what to
/// write instead.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpecError {
    /// A size that is not a number with an optional K/M/G/T/P suffix.
    #[error("bad size {0:?} (use e.g. 512M, 1G, 4T)")]
    BadSize(String),
    /// A memory export larger than the page table allows.
    #[error("memory export of {0} bytes exceeds the 1 PiB limit")]
    TooLarge(u64),
    /// `memory:0`.
    #[error("a memory export needs a size of at least one byte (e.g. memory:1G)")]
    ZeroSize,
    /// `NAME=` with nothing after it.
    #[error("export {0:?} has no path (use {0}=PATH or {0}=memory:SIZE)")]
    MissingPath(String),
    /// `=PATH`: the empty name is how clients ask for the default export.
    #[error("empty export name in {0:?}: the first export is already the default (empty-name) export")]
    EmptyName(String),
    /// Longer than the protocol allows for a name.
    #[error("export name of {0} bytes is longer than the protocol's 4096")]
    NameTooLong(usize),
    /// `a:b=PATH` or `a/b=PATH`: read as a path, which does not exist.
    #[error(
        "{0:?} is neither an existing file nor NAME=PATH: export names given on the command line \
         cannot contain '/' or ':'"
    )]
    Inexpressible(String),
    /// `layers:` or `throwaway:` without the layers they need.
    #[error("{0:?}: {1}")]
    Layers(String, &'static str),
}

impl std::str::FromStr for ExportSpec {
    type Err = SpecError;

    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        // `NAME=` only counts when the part before '=' has no '/' or ':', so
        // paths containing '=' still work when given with a directory.
        let (name, rest) = match arg.split_once('=') {
            Some((name, rest)) if !name.contains('/') && !name.contains(':') => (Some(name.to_owned()), rest),
            Some(_) if !std::path::Path::new(arg).exists() && !arg.starts_with('/') && !arg.starts_with('.') => {
                return Err(SpecError::Inexpressible(arg.to_owned()));
            }
            _ => (None, arg),
        };
        match &name {
            Some(name) if name.is_empty() => return Err(SpecError::EmptyName(arg.to_owned())),
            Some(name) if name.len() > STRING_BYTES_MAX => return Err(SpecError::NameTooLong(name.len())),
            Some(name) if rest.is_empty() => return Err(SpecError::MissingPath(name.clone())),
            _ => {}
        }
        if let Some(list) = rest.strip_prefix("layers:") {
            let paths: Vec<PathBuf> = list.split(',').map(PathBuf::from).collect();
            if paths.len() < 2 || paths.iter().any(|p| p.as_os_str().is_empty()) {
                return Err(SpecError::Layers(arg.to_owned(), "use layers:TOP,LOWER[,LOWER...] (highest first)"));
            }
            let spec = LayerSpec { top: Top::File(paths[0].clone()), lowers: paths[1..].to_vec() };
            return Self::layered(name, spec, arg);
        }
        if let Some(list) = rest.strip_prefix("throwaway:") {
            let paths: Vec<PathBuf> = list.split(',').map(PathBuf::from).collect();
            if paths.iter().any(|p| p.as_os_str().is_empty()) {
                return Err(SpecError::Layers(arg.to_owned(), "use throwaway:IMAGE[,LOWER...] (highest first)"));
            }
            return Self::layered(name, LayerSpec { top: Top::Throwaway, lowers: paths }, arg);
        }
        let source = match rest.strip_prefix("memory:") {
            Some(size) => {
                let bytes = parse_size(size)?;
                if bytes > MEMORY_EXPORT_BYTES_MAX {
                    return Err(SpecError::TooLarge(bytes));
                }
                if bytes == 0 {
                    return Err(SpecError::ZeroSize);
                }
                Source::Memory(bytes)
            }
            None => Source::File(rest.into()),
        };
        Ok(Self { name, source })
    }
}

impl ExportSpec {
    fn layered(name: Option<String>, spec: LayerSpec, arg: &str) -> Result<Self, SpecError> {
        if spec.lowers.len() > LOWER_LAYERS_MAX {
            return Err(SpecError::Layers(arg.to_owned(), "at most 16 lower layers"));
        }
        Ok(Self { name, source: Source::Layers(spec) })
    }
}

/// `123`, `64K`, `512M`, `1G`, `4T`, `1P` (binary multiples, case-insensitive,
/// optional trailing `B` or `iB`).
pub fn parse_size(text: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::BadSize(text.to_owned());
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let unit_text = lower.trim_end_matches("ib").trim_end_matches('b');
    let digits_end = unit_text.find(|c: char| !c.is_ascii_digit()).unwrap_or(unit_text.len());
    let (digits, unit) = unit_text.split_at(digits_end);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(bad()),
    };
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{ExportSpec, Source};

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999P").is_err());
    }

    #[test]
    fn specs_parse_names_and_sources() {
        let s: ExportSpec = "disk=/tmp/a.img".parse().unwrap();
        assert_eq!((s.name.as_deref(), s.source), (Some("disk"), Source::File("/tmp/a.img".into())));
        let s: ExportSpec = "memory:2G".parse().unwrap();
        assert_eq!((s.name, s.source), (None, Source::Memory(2 << 30)));
        let s: ExportSpec = "/data/x=y.img".parse().unwrap();
        assert_eq!((s.name, s.source), (None, Source::File("/data/x=y.img".into())));
        assert!("big=memory:2P".parse::<ExportSpec>().is_err());
        let s: ExportSpec = "vm=layers:/t/top.img,/b/mid.img,/b/base.img".parse().unwrap();
        let layers =
            LayerSpec { top: Top::File("/t/top.img".into()), lowers: vec!["/b/mid.img".into(), "/b/base.img".into()] };
        assert_eq!((s.name.as_deref(), s.source), (Some("vm"), Source::Layers(layers)));
        let s: ExportSpec = "throwaway:/b/base.img".parse().unwrap();
        let layers = LayerSpec { top: Top::Throwaway, lowers: vec!["/b/base.img".into()] };
        assert_eq!((s.name, s.source), (None, Source::Layers(layers)));
        assert!(matches!("layers:/only-top.img".parse::<ExportSpec>(), Err(SpecError::Layers(..))));
        assert!(matches!("layers:/a,,/b".parse::<ExportSpec>(), Err(SpecError::Layers(..))));
        assert!(matches!("throwaway:".parse::<ExportSpec>(), Err(SpecError::Layers(..))));
    }

    #[test]
    fn specs_the_command_line_cannot_mean_are_refused_clearly() {
        let err = |arg: &str| arg.parse::<ExportSpec>().unwrap_err();
        assert_eq!(err("x="), SpecError::MissingPath("x".into()));
        assert_eq!(err("memory:0"), SpecError::ZeroSize);
        assert_eq!(err("=memory:1M"), SpecError::EmptyName("=memory:1M".into()));
        assert!(matches!(err("a:b=memory:1M"), SpecError::Inexpressible(_)));
        assert!(matches!(err(&format!("{}=memory:1M", "n".repeat(5000))), SpecError::NameTooLong(5000)));
        assert!(err("x=").to_string().contains("x=PATH"));
        // A path with '=' in a directory still works.
        assert!("/data/x=y.img".parse::<ExportSpec>().is_ok());
    }
}
