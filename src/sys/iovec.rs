//! Lists of `iovec`s handed to the kernel's vectored calls, which may take part of them.

/// Drops the first `n` bytes of an iovec list.
pub fn advance(iovs: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut skip = 0;
    while skip < iovs.len() && n >= iovs[skip].iov_len {
        n -= iovs[skip].iov_len;
        skip += 1;
    }
    let rest = &mut iovs[skip..];
    if let Some(first) = rest.first_mut() {
        first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
        first.iov_len -= n;
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_drops_whole_entries_then_the_front_of_the_next() {
        let bytes = [0u8; 16];
        let iov = |at: usize, len: usize| libc::iovec { iov_base: bytes[at..].as_ptr() as *mut _, iov_len: len };
        let mut list = [iov(0, 4), iov(4, 6), iov(10, 6)];
        let rest = advance(&mut list, 7);
        assert_eq!(rest.len(), 2);
        assert_eq!((rest[0].iov_base as usize - bytes.as_ptr() as usize, rest[0].iov_len), (7, 3));
        assert_eq!(rest[1].iov_len, 6);
        let rest = advance(rest, 9);
        assert!(rest.is_empty(), "everything taken");
        assert!(advance(&mut [], 0).is_empty());
    }
}
