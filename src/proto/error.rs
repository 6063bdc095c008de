//! Protocol-layer errors, split by consequence: a `DecodeError` describes a
//! malformed message; `NbdError` is the per-request error code that travels
//! back to the client while the connection stays up.

use thiserror::Error;

/// Why bytes could not be decoded. Carries the name of the field involved.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message ended before this field.
    #[error("message too short reading {0}")]
    Short(&'static str),
    /// Bytes were left over after the last field.
    #[error("trailing bytes after {0}")]
    Trailing(&'static str),
    /// A string exceeded the spec's 4096-byte ceiling.
    #[error("{0} longer than 4096 bytes")]
    TooLong(&'static str),
    /// A string was not valid UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
}

/// NBD error codes as carried in replies (spec "Error values").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdError {
    /// The single place where host errno values become NBD errors. Values the
    /// spec has no name for become EIO, which clients treat as a plain failure.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::EPERM | libc::EROFS | libc::EACCES => Self::Perm,
            libc::ENOMEM => Self::NoMem,
            libc::EINVAL => Self::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Self::NoSpc,
            libc::EOVERFLOW => Self::Overflow,
            libc::EOPNOTSUPP => Self::NotSup,
            libc::ESHUTDOWN => Self::Shutdown,
            _ => Self::Io,
        }
    }

    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::Perm => "export is read-only",
            Self::Io => "I/O error",
            Self::NoMem => "out of memory",
            Self::Inval => "invalid request",
            Self::NoSpc => "request beyond the end of the export",
            Self::Overflow => "request too large",
            Self::NotSup => "operation not supported fast",
            Self::Shutdown => "server is shutting down",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_covers_spec_rules() {
        assert_eq!(NbdError::from_errno(libc::EROFS), NbdError::Perm);
        assert_eq!(NbdError::from_errno(libc::EDQUOT), NbdError::NoSpc);
        assert_eq!(NbdError::from_errno(libc::EFBIG), NbdError::NoSpc);
        assert_eq!(NbdError::from_errno(libc::EOPNOTSUPP), NbdError::NotSup);
        assert_eq!(NbdError::from_errno(libc::EBADF), NbdError::Io);
        assert_eq!(NbdError::Inval.code(), 22);
        assert_eq!(NbdError::Shutdown.code(), 108);
    }
}
