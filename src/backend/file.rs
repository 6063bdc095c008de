//! File and block-device exports.
//!
//! Two descriptors per export: `direct` (O_DIRECT when the filesystem allows
//! it) carries the hot path; `buffered` serves the rare requests O_DIRECT
//! cannot express, namely writes touching an unaligned final block, which an
//! aligned O_DIRECT write would extend past the end of the export. Both refer
//! to one inode, so fdatasync on either makes every reply-acknowledged write
//! durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::BackendError;

/// `_IOR(0x12, 114, size_t)`: byte size of a block device (not in libc).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// Used when the kernel cannot tell us the direct-I/O alignment; every
/// device in practice accepts 4096-byte alignment.
const FALLBACK_DIRECT_ALIGNMENT: u32 = 4096;

#[derive(Debug)]
pub struct FileBackend {
    pub path: PathBuf,
    direct: File,
    buffered: File,
    pub size: u64,
    /// O_DIRECT is in effect on `direct`.
    pub direct_io: bool,
    /// Offset and length alignment O_DIRECT needs (1 when buffered).
    pub alignment: u32,
    pub is_block_device: bool,
    /// fallocate(PUNCH_HOLE) works, so trim and zeroing are metadata-only
    /// (known once `probe_hole_punching` ran).
    pub can_punch_hole: bool,
    read_only: bool,
    /// Allocation granularity of the filesystem (st_blksize, at least 512).
    pub block_bytes: u64,
    /// The file lives in memory (tmpfs/ramfs): reads and writes are copies
    /// done inline, because these filesystems support no non-blocking
    /// (NOWAIT) I/O and io_uring would hand every one to a worker thread.
    pub inline_io: bool,
    /// The whole file mapped, for one-copy large transfers (in-memory
    /// regular files only; see `backend::mapping`).
    pub mapping: Option<super::mapping::Mapping>,
    /// Which file this is, whatever path named it: exports of one file share
    /// its extent cache and block locks (see `export::image`).
    pub identity: FileIdentity,
}

/// Device and inode of a regular file, or the device number of a block
/// device: equal for every path that reaches the same storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileIdentity {
    File { device: u64, inode: u64 },
    BlockDevice { rdev: u64 },
}

impl FileIdentity {
    pub fn of(metadata: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        match metadata.file_type().is_block_device() {
            true => FileIdentity::BlockDevice { rdev: metadata.rdev() },
            false => FileIdentity::File { device: metadata.dev(), inode: metadata.ino() },
        }
    }

    /// The identity of what `path` names now (symbolic links followed).
    pub fn of_path(path: &Path) -> std::io::Result<Self> {
        std::fs::metadata(path).map(|m| Self::of(&m))
    }
}

impl FileBackend {
    pub fn open(path: &Path, read_only: bool, want_direct: bool) -> Result<Self, BackendError> {
        let open_error = |source| BackendError::Open { path: path.to_owned(), source };
        let buffered = open_file(path, read_only, 0).map_err(open_error)?;
        let metadata = buffered.metadata().map_err(open_error)?;
        let is_block_device = metadata.file_type().is_block_device();
        if !is_block_device && !metadata.is_file() {
            return Err(BackendError::NotAFile(path.to_owned()));
        }
        let size = if is_block_device { block_device_size(&buffered).map_err(open_error)? } else { metadata.len() };
        let inline_io = !is_block_device && is_memory_filesystem(&buffered);
        if inline_io && want_direct {
            crate::note!(
                "{}: on tmpfs, served with inline copies (O_DIRECT means nothing there, and io_uring \
                 would punt every I/O to a worker thread)",
                path.display()
            );
        }
        let (direct, direct_io, alignment) = match want_direct && !inline_io {
            true => open_direct(path, read_only, &buffered, size)?,
            false => (buffered.try_clone().map_err(open_error)?, false, 1),
        };
        use std::os::unix::fs::MetadataExt;
        let identity = FileIdentity::of(&metadata);
        // Without a mapping (too big for the address space, say) large
        // transfers are copied through buffers like everything else.
        let mapping = (inline_io && size > 0)
            .then(|| super::mapping::Mapping::new(buffered.as_raw_fd(), size, !read_only).ok())
            .flatten();
        Ok(Self {
            mapping,
            identity,
            path: path.to_owned(),
            direct,
            buffered,
            size,
            direct_io,
            alignment,
            is_block_device,
            // Probed by `probe_hole_punching`: the probe touches the file.
            can_punch_hole: false,
            read_only,
            inline_io,
            block_bytes: metadata.blksize().max(512).next_power_of_two(),
        })
    }

    pub fn direct_fd(&self) -> RawFd {
        self.direct.as_raw_fd()
    }

    pub fn buffered_fd(&self) -> RawFd {
        self.buffered.as_raw_fd()
    }

    /// The buffered descriptor, for positional I/O of any alignment off
    /// the ring (layer copy-up and commit).
    pub fn buffered_file(&self) -> &File {
        &self.buffered
    }

    /// Copies file bytes at `offset` into `target` (inline_io files only).
    pub fn read_inline(&self, offset: u64, target: &mut [u8]) -> io::Result<()> {
        debug_assert!(self.inline_io);
        let fd = self.buffered.as_raw_fd();
        transfer_all(target.len(), io::ErrorKind::UnexpectedEof, |done| {
            let rest = &mut target[done..];
            // SAFETY: the pointer and length describe the unfilled tail of `target`.
            unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), rest.len(), (offset + done as u64) as libc::off_t) }
        })
    }

    /// Copies `source` into the file at `offset` (inline_io files only).
    pub fn write_inline(&self, offset: u64, source: &[u8]) -> io::Result<()> {
        debug_assert!(self.inline_io);
        let fd = self.buffered.as_raw_fd();
        transfer_all(source.len(), io::ErrorKind::WriteZero, |done| {
            let rest = &source[done..];
            // SAFETY: the pointer and length describe the unwritten tail of `source`.
            unsafe { libc::pwrite(fd, rest.as_ptr().cast(), rest.len(), (offset + done as u64) as libc::off_t) }
        })
    }

    /// Finds out whether trim and zeroing can punch holes. The probe (a
    /// punch past the end of the file) changes nothing but the file's
    /// modification time, so it runs only once the image is ours: after
    /// its lock is taken and change tracking has compared that time with
    /// its record.
    pub fn probe_hole_punching(&mut self) {
        self.can_punch_hole = !self.read_only && probe_punch_hole(&self.buffered, self.size, self.is_block_device);
    }

    /// Blocking fdatasync, used only at shutdown.
    pub fn sync(&self) -> io::Result<()> {
        self.direct.sync_data()
    }

    /// Opened without write access.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The file's metadata now (its modification time, for the clean
    /// shutdown record of change tracking).
    pub fn metadata(&self) -> io::Result<std::fs::Metadata> {
        self.buffered.metadata()
    }

    /// Takes an open-file-description lock on the whole file: exclusive
    /// for a writer, shared for a reader. It lives as long as the backend's
    /// descriptors and conflicts with the same lock taken by any other
    /// process (another ringnbd, or qemu's image locking), which gets
    /// `WouldBlock`.
    pub fn lock(&self, exclusive: bool) -> io::Result<()> {
        // SAFETY: flock is plain data; all-zero is a valid value to fill in.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = if exclusive { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = 0;
        lock.l_len = 0; // to the end, however far it grows
        // SAFETY: fcntl(F_OFD_SETLK) reads one flock from a live local.
        let rc = unsafe { libc::fcntl(self.buffered.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Err(io::ErrorKind::WouldBlock.into()),
            _ => Err(error),
        }
    }
}

/// Repeats a positional read or write (`step(done)` returns the syscall's
/// result) until `len` bytes are through; a zero return is `stalled`.
fn transfer_all(len: usize, stalled: io::ErrorKind, mut step: impl FnMut(usize) -> isize) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        match step(done) {
            n if n > 0 => done += n as usize,
            0 => return Err(stalled.into()),
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

fn open_file(path: &Path, read_only: bool, custom_flags: i32) -> io::Result<File> {
    OpenOptions::new().read(true).write(!read_only).custom_flags(custom_flags | libc::O_CLOEXEC).open(path)
}

/// Opens with O_DIRECT and proves it works with one aligned read; falls back
/// to a buffered descriptor (logged) where the filesystem refuses.
fn open_direct(path: &Path, read_only: bool, buffered: &File, size: u64) -> Result<(File, bool, u32), BackendError> {
    let fallback = |why: String| {
        crate::note!("{}: O_DIRECT unavailable ({why}); using buffered I/O", path.display());
        let file = buffered.try_clone().map_err(|source| BackendError::Open { path: path.to_owned(), source })?;
        Ok((file, false, 1))
    };
    let direct = match open_file(path, read_only, libc::O_DIRECT) {
        Ok(file) => file,
        Err(e) => return fallback(e.to_string()),
    };
    let alignment = direct_alignment(&direct);
    if let Err(e) = probe_direct_read(&direct, alignment, size) {
        return fallback(e.to_string());
    }
    Ok((direct, true, alignment))
}

/// statx(STATX_DIOALIGN) where the kernel knows it; the logical sector size
/// for block devices; else a conservative 4096.
fn direct_alignment(file: &File) -> u32 {
    // SAFETY: statx is a plain out-parameter struct; zeroed is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: fd is open, the path is a valid C string, `stx` is writable.
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), empty.as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    let reported = stx.stx_dio_offset_align.max(stx.stx_dio_mem_align);
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && reported.is_power_of_two() {
        // Buffers come from 4096-aligned pool memory; only the file offset
        // alignment constrains requests.
        return stx.stx_dio_offset_align.max(512);
    }
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int; fails harmlessly on regular files.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut sector) } == 0 && sector > 0 {
        return sector as u32;
    }
    FALLBACK_DIRECT_ALIGNMENT
}

fn probe_direct_read(file: &File, alignment: u32, size: u64) -> io::Result<()> {
    let len = FALLBACK_DIRECT_ALIGNMENT.max(alignment) as usize;
    if size < len as u64 {
        return Ok(()); // nothing to read; an empty file cannot refuse
    }
    let layout = std::alloc::Layout::from_size_align(len, len).expect("power of two");
    // SAFETY: layout has non-zero size.
    let buf = unsafe { std::alloc::alloc(layout) };
    if buf.is_null() {
        return Err(io::Error::from(io::ErrorKind::OutOfMemory));
    }
    // SAFETY: buf is valid for `len` bytes until dealloc below.
    let rc = unsafe { libc::pread(file.as_raw_fd(), buf.cast(), len, 0) };
    let result = if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    result
}

/// PUNCH_HOLE at the end of the file changes nothing but tells us whether
/// the filesystem supports it. Block devices support it since Linux 4.9.
fn probe_punch_hole(file: &File, size: u64, is_block_device: bool) -> bool {
    if is_block_device {
        return true;
    }
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let at = size.next_multiple_of(4096) as libc::off_t;
    // SAFETY: fallocate on an open fd; the range lies past EOF so no data changes.
    unsafe { libc::fallocate(file.as_raw_fd(), mode, at, 4096) == 0 }
}

/// tmpfs and ramfs keep file data in memory and offer no NOWAIT I/O.
fn is_memory_filesystem(file: &File) -> bool {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    // SAFETY: statfs is plain data; all-zero is a valid value to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills `st` for an open fd.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as libc::c_long, TMPFS_MAGIC | RAMFS_MAGIC)
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, len: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ringnbd-file-test-{}-{name}", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        path
    }

    #[test]
    fn opens_direct_on_tmp_and_reports_alignment() {
        let path = temp_file("direct", 1 << 20);
        let mut b = FileBackend::open(&path, false, true).unwrap();
        assert!(!b.can_punch_hole, "not probed yet");
        b.probe_hole_punching();
        assert_eq!(b.size, 1 << 20);
        assert!(b.alignment.is_power_of_two());
        if b.direct_io {
            assert!(b.alignment >= 512);
        }
        assert!(b.can_punch_hole, "ext4 and tmpfs both punch holes");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn buffered_mode_has_no_alignment_and_read_only_cannot_punch() {
        let path = temp_file("buffered", 12345);
        let mut b = FileBackend::open(&path, true, false).unwrap();
        b.probe_hole_punching();
        assert_eq!((b.size, b.direct_io, b.alignment, b.can_punch_hole), (12345, false, 1, false));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn directories_are_refused() {
        let err = FileBackend::open(&std::env::temp_dir(), true, false).unwrap_err();
        assert!(matches!(err, BackendError::NotAFile(_)));
    }
}
