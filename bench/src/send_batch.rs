//! Partial-send arithmetic for a batch of iovecs, pure and tested (a short
//! sendmsg must resume exactly where the kernel stopped).

/// Accounts `sent` bytes against the front of `iovecs`: fully sent entries
/// are counted and left alone, a partially sent one is advanced in place.
/// Returns the number of leading entries now fully sent.
pub fn consume(iovecs: &mut [libc::iovec], mut sent: usize) -> usize {
    let mut complete = 0;
    for iovec in iovecs.iter_mut() {
        if sent == 0 && iovec.iov_len > 0 {
            break;
        }
        if sent >= iovec.iov_len {
            sent -= iovec.iov_len;
            complete += 1;
            continue;
        }
        // Pointer arithmetic only (no dereference), hence wrapping_add.
        iovec.iov_base = iovec.iov_base.cast::<u8>().wrapping_add(sent).cast();
        iovec.iov_len -= sent;
        sent = 0;
        break;
    }
    assert_eq!(sent, 0, "the kernel reported more bytes sent than were queued");
    complete
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iovecs(buffer: &mut [u8], lengths: &[usize]) -> Vec<libc::iovec> {
        let mut at = 0;
        lengths
            .iter()
            .map(|&len| {
                let iovec = libc::iovec { iov_base: buffer[at..].as_mut_ptr().cast(), iov_len: len };
                at += len;
                iovec
            })
            .collect()
    }

    #[test]
    fn whole_partial_and_multiple_entries() {
        let mut buffer = [0u8; 100];
        let base = buffer.as_ptr() as usize;
        let mut v = iovecs(&mut buffer, &[28, 32, 40]);
        assert_eq!(consume(&mut v, 0), 0);
        assert_eq!(consume(&mut v, 10), 0);
        assert_eq!((v[0].iov_base as usize - base, v[0].iov_len), (10, 18));
        // The rest of the first, all of the second, 5 of the third.
        assert_eq!(consume(&mut v, 18 + 32 + 5), 2);
        assert_eq!((v[2].iov_base as usize - base, v[2].iov_len), (65, 35));
        assert_eq!(consume(&mut v[2..], 35), 1);
    }

    #[test]
    fn exact_boundaries() {
        let mut buffer = [0u8; 60];
        let mut v = iovecs(&mut buffer, &[28, 32]);
        assert_eq!(consume(&mut v, 28), 1);
        assert_eq!(v[1].iov_len, 32, "the next entry is untouched");
        assert_eq!(consume(&mut v[1..], 32), 1);
    }

    #[test]
    #[should_panic(expected = "more bytes sent")]
    fn over_reporting_is_a_bug() {
        let mut buffer = [0u8; 8];
        let mut v = iovecs(&mut buffer, &[8]);
        consume(&mut v, 9);
    }
}
