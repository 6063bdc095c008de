//! Export arguments from the command line: `[NAME=]PATH` and
//! `[NAME=]memory:SIZE`, parsed but not yet opened.

use crate::backend::memory::MEMORY_EXPORT_BYTES_MAX;

use super::ExportError;

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
}
