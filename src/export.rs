//! Exports: parsing `[NAME=]PATH` / `[NAME=]memory:SIZE`, opening backends,
//! and the negotiation-facing description of each export.

use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use crate::backend::memory::MEMORY_EXPORT_BYTES_MAX;
use crate::backend::{Backend, BackendError, FileBackend, MemoryBackend};
use crate::meta::extent_cache::ExtentCache;
use crate::proto::handshake::{BlockSize, ExportInfo};
use crate::proto::meta::ContextKind;
use crate::proto::wire::*;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ExportError {
    /// `SIZE` in `memory:SIZE` is not a number with an optional K/M/G/T/P suffix.
    #[error("bad size {0:?} (use e.g. 512M, 1G, 4T)")]
    BadSize(String),
    /// A memory export larger than the page table allows.
    #[error("memory export of {0} bytes exceeds the 1 PiB limit")]
    TooLarge(u64),
    /// Two exports with one name.
    #[error("duplicate export name {0:?}")]
    DuplicateName(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// One `EXPORT` argument, parsed but not yet opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: Option<String>,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(std::path::PathBuf),
    Memory(u64),
}

impl std::str::FromStr for ExportSpec {
    type Err = ExportError;

    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        // `NAME=` only counts when the part before '=' has no '/', so paths
        // containing '=' still work when given with a directory.
        let (name, rest) = match arg.split_once('=') {
            Some((name, rest)) if !name.contains('/') && !name.contains(':') => (Some(name.to_owned()), rest),
            _ => (None, arg),
        };
        let source = match rest.strip_prefix("memory:") {
            Some(size) => {
                let bytes = parse_size(size)?;
                if bytes > MEMORY_EXPORT_BYTES_MAX {
                    return Err(ExportError::TooLarge(bytes));
                }
                Source::Memory(bytes)
            }
            None => Source::File(rest.into()),
        };
        Ok(Self { name, source })
    }
}

/// `123`, `64K`, `512M`, `1G`, `4T`, `1P` (binary multiples, case-insensitive,
/// optional trailing `B` or `iB`).
pub fn parse_size(text: &str) -> Result<u64, ExportError> {
    let bad = || ExportError::BadSize(text.to_owned());
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

/// Options shared by every export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub read_only: bool,
    pub direct_io: bool,
    pub description: Option<String>,
    pub payload_bytes_max: u32,
    /// Extent-cache capacity per file export; 0 turns the cache off.
    pub extent_cache_entries: usize,
}

pub struct Export {
    pub info: ExportInfo,
    pub backend: Backend,
    pub read_only: bool,
    /// Held while a read-modify-write of an unaligned write is in flight.
    /// Two unaligned writes that share a block but not bytes would otherwise
    /// each write back the other's stale bytes; aligned writes never share a
    /// block with another request without sharing bytes, so only RMW needs it.
    pub rmw_busy: AtomicBool,
    /// Cached allocation of a file export (None: memory, block device, or off).
    pub extent_cache: Option<ExtentCache>,
}

impl Export {
    pub fn open(spec: &ExportSpec, index: usize, options: &ExportOptions) -> Result<Self, ExportError> {
        let (backend, default_name) = match &spec.source {
            Source::File(path) => {
                let file = FileBackend::open(path, options.read_only, options.direct_io)?;
                let base = path.file_name().map(|n| n.to_string_lossy().into_owned());
                (Backend::File(file), base.unwrap_or_else(|| format!("export{index}")))
            }
            Source::Memory(size) => (Backend::Memory(MemoryBackend::new(*size)), format!("memory{index}")),
        };
        let name = spec.name.clone().unwrap_or(default_name);
        let description = options.description.clone().unwrap_or_else(|| describe(&backend, options.read_only));
        // Clients bound by a minimum block size may not address an unaligned
        // tail (libnbd refuses, qemu asserts), so an export whose size is not
        // a multiple of the O_DIRECT alignment advertises 1 and relies on the
        // bounce/read-modify-write path instead.
        let minimum = match backend.alignment() {
            a if backend.size().is_multiple_of(u64::from(a)) => a,
            _ => 1,
        };
        let info = ExportInfo {
            name,
            description,
            size: backend.size(),
            flags: export_flags(&backend, options.read_only),
            block_size: BlockSize { minimum, preferred: minimum.max(4096), maximum: options.payload_bytes_max },
            contexts: ContextKind::ALL.to_vec(),
        };
        let extent_cache = match &backend {
            Backend::File(f) if !f.is_block_device && options.extent_cache_entries > 0 => {
                Some(ExtentCache::new(options.extent_cache_entries, f.block_bytes))
            }
            _ => None,
        };
        Ok(Self { info, backend, read_only: options.read_only, rmw_busy: AtomicBool::new(false), extent_cache })
    }

    /// Tries to take the read-modify-write guard; see `rmw_busy`.
    pub fn try_begin_rmw(&self) -> bool {
        self.rmw_busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    pub fn end_rmw(&self) {
        let was = self.rmw_busy.swap(false, Ordering::Release);
        debug_assert!(was, "end_rmw without begin");
    }
}

fn describe(backend: &Backend, read_only: bool) -> String {
    let access = if read_only { "read-only" } else { "read-write" };
    match backend {
        Backend::File(f) => {
            let io = if f.direct_io { "O_DIRECT" } else { "buffered" };
            format!("{} ({access}, {io})", f.path.display())
        }
        Backend::Memory(_) => format!("sparse memory ({access})"),
    }
}

/// Flags that hold whatever the client negotiates. CAN_MULTI_CONN is safe:
/// there is no per-connection cache, and FLUSH syncs the shared inode.
fn export_flags(backend: &Backend, read_only: bool) -> u16 {
    let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if read_only {
        flags |= TF_READ_ONLY;
    } else {
        flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        if backend.fast_zero() {
            flags |= TF_SEND_FAST_ZERO;
        }
    }
    flags
}

pub fn open_all(specs: &[ExportSpec], options: &ExportOptions) -> Result<Vec<Export>, ExportError> {
    let mut exports: Vec<Export> = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let export = Export::open(spec, index, options)?;
        if exports.iter().any(|e| e.info.name == export.info.name) {
            return Err(ExportError::DuplicateName(export.info.name));
        }
        exports.push(export);
    }
    Ok(exports)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn read_only_exports_do_not_offer_writes() {
        let options = ExportOptions {
            read_only: true,
            direct_io: false,
            description: None,
            payload_bytes_max: 1 << 25,
            extent_cache_entries: 0,
        };
        let e = Export::open(&"memory:1M".parse().unwrap(), 0, &options).unwrap();
        assert_ne!(e.info.flags & TF_READ_ONLY, 0);
        assert_eq!(e.info.flags & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO), 0);
        assert_ne!(e.info.flags & TF_CAN_MULTI_CONN, 0);
        assert_eq!(e.info.name, "memory0");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let options = ExportOptions {
            read_only: false,
            direct_io: false,
            description: None,
            payload_bytes_max: 1 << 25,
            extent_cache_entries: 0,
        };
        let specs = vec!["a=memory:1M".parse().unwrap(), "a=memory:2M".parse().unwrap()];
        assert!(matches!(open_all(&specs, &options), Err(ExportError::DuplicateName(_))));
    }
}
