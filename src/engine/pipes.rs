//! Pipes for zero-copy reads: a READ of a page-cache-backed file is
//! spliced into a pipe of its own (the pipe then holds references to the
//! file's pages, not copies), and the reply sends the pipe's contents to
//! the socket with another splice. Neither step copies a byte in user
//! space, and on loopback the receiver's copy out of those pages is the
//! only copy of the data there is.
//!
//! A request owns its pipe from admission until its reply is on the wire,
//! like a buffer. Each worker keeps the emptied ones for the next reads;
//! a pipe that still holds data when its request is freed (a connection
//! dropped mid-reply) is closed instead, which discards the data.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Reads smaller than this are copied, so the small-request paths (and
/// their measured latency) stay exactly as they were.
pub const SPLICE_READ_BYTES_MIN: usize = 64 << 10;
/// The largest read spliced: what a pipe may hold without privileges
/// (`/proc/sys/fs/pipe-max-size` defaults to 1 MiB); larger reads are
/// copied.
pub const PIPE_BYTES_MAX: usize = 1 << 20;
/// Pipes one worker has open at once (each costs two descriptors and,
/// while full, a ring of page references).
pub const PIPES_MAX: usize = 256;

/// A pipe that holds at least [`PIPE_BYTES_MAX`].
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn open(capacity: usize) -> Option<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into a live array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return None;
        }
        // SAFETY: both were just returned by pipe2 and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe this function owns.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, capacity as libc::c_int) };
        (got >= 0 && got as usize >= capacity).then_some(Pipe { read, write })
    }

    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// Bytes waiting in the pipe.
    fn queued(&self) -> usize {
        let mut bytes: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int for a pipe this struct owns.
        let rc = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut bytes) };
        if rc < 0 { usize::MAX } else { bytes as usize }
    }
}

/// A worker's pipes.
#[derive(Default)]
pub struct PipePool {
    spare: Vec<Pipe>,
    /// Pipes open, spare and in use.
    open: usize,
    /// The system refused a pipe of PIPE_BYTES_MAX: stop asking.
    unavailable: bool,
}

impl PipePool {
    /// A pipe that holds `len` bytes, or None (the read is copied instead).
    pub fn take(&mut self, len: usize) -> Option<Pipe> {
        if len > PIPE_BYTES_MAX {
            return None;
        }
        if let Some(pipe) = self.spare.pop() {
            return Some(pipe);
        }
        if self.unavailable || self.open >= PIPES_MAX {
            return None;
        }
        match Pipe::open(PIPE_BYTES_MAX) {
            Some(pipe) => {
                self.open += 1;
                Some(pipe)
            }
            None => {
                self.unavailable = true;
                crate::note!(
                    "pipes of {} KiB are not available (fs.pipe-max-size, or the descriptor limit): \
                     large reads are copied",
                    PIPE_BYTES_MAX >> 10
                );
                None
            }
        }
    }

    /// Takes a pipe back: kept when empty, closed when it still holds data.
    pub fn give(&mut self, pipe: Pipe) {
        if pipe.queued() == 0 {
            self.spare.push(pipe);
        } else {
            self.open -= 1;
        }
    }
}

/// Moves `len` bytes of `file` at `offset` into `pipe` (all of them, or
/// an error: the pipe has room for them). For files whose pages are in
/// memory (tmpfs), so this never waits for a disk.
pub fn fill(pipe: &Pipe, file: RawFd, offset: u64, len: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        let mut at = (offset + done as u64) as libc::loff_t;
        // SAFETY: splice between descriptors owned by the caller and this
        // pipe; `at` is a live local the kernel advances.
        let n = unsafe {
            libc::splice(file, &mut at, pipe.write_fd(), std::ptr::null_mut(), len - done, libc::SPLICE_F_NONBLOCK)
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => return Err(std::io::Error::last_os_error()),
        }
    }
    Ok(())
}

/// Sends up to `len` bytes from `pipe` to `socket` without waiting: the
/// bytes sent, or an error (`WouldBlock`: the socket is full). `more`
/// says more of the reply follows.
pub fn drain(pipe: &Pipe, socket: RawFd, len: usize, more: bool) -> std::io::Result<usize> {
    let flags = libc::SPLICE_F_NONBLOCK | if more { libc::SPLICE_F_MORE } else { 0 };
    // SAFETY: splice from this pipe to the caller's socket; no offsets.
    let n = unsafe { libc::splice(pipe.read_fd(), std::ptr::null_mut(), socket, std::ptr::null_mut(), len, flags) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Whether a READ may be answered with one hole chunk: structured replies
/// without DF.
pub fn hole_chunk_allowed(mode: crate::proto::transmission::ReplyMode, df: bool) -> bool {
    mode != crate::proto::transmission::ReplyMode::Simple && !df
}

/// Whether `file` has no data in `offset..offset + len` (a hole), by
/// SEEK_DATA (which finds data at `offset` at once, so the scan is long
/// only across a long hole). Errors say "not known to be a hole".
pub fn is_hole(file: RawFd, offset: u64, len: usize) -> bool {
    // SAFETY: lseek on the caller's descriptor; its file position is not
    // used by anyone (all I/O is positional).
    let data = unsafe { libc::lseek(file, offset as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data as u64 >= offset + len as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_range_goes_through_a_pipe_and_a_kept_pipe_is_empty() {
        let dir = std::env::temp_dir().join(format!("ringnbd-pipes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let data: Vec<u8> = (0..(256 << 10)).map(|i| (i % 253) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut pool = PipePool::default();
        let pipe = pool.take(128 << 10).expect("a pipe");
        fill(&pipe, file.as_raw_fd(), 4096, 128 << 10).unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut sent = 0;
        while sent < 128 << 10 {
            sent += drain(&pipe, b.as_raw_fd(), (128 << 10) - sent, false).unwrap();
            let mut got = vec![0; 128 << 10];
            let mut read = 0;
            while read < sent {
                read += std::io::Read::read(&mut a, &mut got[read..sent]).unwrap();
            }
            assert_eq!(&got[..sent], &data[4096..4096 + sent]);
        }
        pool.give(pipe);
        assert_eq!(pool.spare.len(), 1, "an emptied pipe is kept");
        let pipe = pool.take(64 << 10).unwrap();
        fill(&pipe, file.as_raw_fd(), 0, 64 << 10).unwrap();
        pool.give(pipe);
        assert_eq!((pool.spare.len(), pool.open), (0, 0), "a pipe with data left is closed");
        assert!(pool.take(PIPE_BYTES_MAX + 1).is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
