//! The end of an image's service: the final flush and the clean-shutdown
//! record of its change tracking (at shutdown, or when the last export of
//! it is removed while serving).

use std::time::Duration;

use crate::backend::Backend;
use crate::export::Image;
use crate::track::ImageStat;

/// The last thing done to an image: flush it, then record the clean
/// shutdown of its change tracking with the size and modification time it
/// ends with, so changes made while ringnbd is not running are noticed.
pub(super) fn finish_image(image: &Image, writable: bool) {
    if let Backend::Layered(layers) = &image.backend
        && writable
        && !layers.throwaway
        && let Err(e) = layers.top.sync()
    {
        crate::note!("{}: final flush failed: {e}", layers.top.path.display());
    }
    let Backend::File(file) = &image.backend else { return };
    if writable && let Err(e) = file.sync() {
        crate::note!("{}: final flush failed: {e}", file.path.display());
        // Not clean: the next start treats it like a crash (marks still cover it).
        return;
    }
    let Some(tracker) = &image.track else { return };
    let Ok(metadata) = file.metadata() else { return };
    wait_past_modification_time(&metadata);
    if let Err(e) = tracker.shut_down_cleanly(ImageStat::of(&metadata, file.size)) {
        crate::note!("{}: could not record the clean shutdown: {e}", file.path.display());
    }
}

/// Waits until the clock used for file timestamps has moved past the
/// image's modification time, so any later write (by anyone) leaves a
/// different one. Timestamps come from a coarse clock (a few milliseconds);
/// a file system that keeps whole seconds (nanoseconds all zero) makes this
/// wait up to a second.
fn wait_past_modification_time(metadata: &std::fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    let (seconds, nanos) = (metadata.mtime(), metadata.mtime_nsec());
    let whole_seconds = nanos == 0;
    for _ in 0..2000 {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
        let past = if whole_seconds { now.tv_sec > seconds } else { (now.tv_sec, now.tv_nsec) > (seconds, nanos) };
        if past {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
