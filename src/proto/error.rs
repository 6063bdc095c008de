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
            libc::ESHUTDOWN => Self::Shutdown,
            _ => Self::Io,
        }
    }

    pub fn code(self) -> u32 {
        self as u32
    }

    /// The errno name the spec gives the value (for logs and metrics).
    pub fn name(self) -> &'static str {
        match self {
            Self::Perm => "EPERM",
            Self::Io => "EIO",
            Self::NoMem => "ENOMEM",
            Self::Inval => "EINVAL",
            Self::NoSpc => "ENOSPC",
            Self::Overflow => "EOVERFLOW",
            Self::NotSup => "ENOTSUP",
            Self::Shutdown => "ESHUTDOWN",
        }
    }

    /// This error with the reason the client will be shown.
    pub const fn because(self, message: &'static str) -> Failure {
        Failure { code: self, message }
    }
}

/// A request's failure: the NBD error code and a human-readable reason,
/// which structured replies carry in the error chunk. The reason says what
/// happened ("no space left on the storage", "read past the end of the
/// export"), not just what the code means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub code: NbdError,
    pub message: &'static str,
}

impl Failure {
    /// A host I/O error, with its errno's meaning as the reason. This and
    /// [`NbdError::from_errno`] are the only places errno values are read.
    pub fn from_errno(errno: i32) -> Self {
        let message = match errno {
            libc::ENOSPC => "no space left on the storage behind the export",
            libc::EDQUOT => "disk quota exceeded on the storage behind the export",
            libc::EFBIG => "file size limit reached on the storage behind the export",
            libc::EIO => "I/O error on the storage behind the export",
            libc::EROFS => "the storage behind the export is read-only",
            libc::EPERM | libc::EACCES => "permission denied by the storage behind the export",
            libc::ENOMEM => "the server is out of memory",
            libc::EINVAL => "the storage refused the request as invalid",
            libc::EOVERFLOW => "request too large for the storage",
            libc::EOPNOTSUPP => "operation not supported by the storage",
            libc::ESHUTDOWN => "server is shutting down",
            libc::ENXIO | libc::ENODEV => "the device behind the export is gone",
            _ => "unexpected error from the storage behind the export",
        };
        NbdError::from_errno(errno).because(message)
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
        // ENOTSUP is reserved for FAST_ZERO refusals, which say so themselves.
        assert_eq!(NbdError::from_errno(libc::EOPNOTSUPP), NbdError::Io);
        assert_eq!(NbdError::from_errno(libc::EBADF), NbdError::Io);
        assert_eq!(NbdError::Inval.code(), 22);
        assert_eq!(NbdError::Shutdown.code(), 108);
    }

    #[test]
    fn failures_from_errno_say_what_happened() {
        let f = Failure::from_errno(libc::ENOSPC);
        assert_eq!(f.code, NbdError::NoSpc);
        assert!(f.message.contains("space"), "{}", f.message);
        assert_eq!(Failure::from_errno(libc::EIO).code, NbdError::Io);
        assert!(Failure::from_errno(libc::EIO).message.contains("I/O error"));
        assert!(Failure::from_errno(libc::EDQUOT).message.contains("quota"));
        assert_eq!(Failure::from_errno(libc::EBADF).code, NbdError::Io);
    }
}
