//! The process's open-file limit. Every connection holds a control socket and, per channel and
//! direction, its data sockets; with the usual soft limit of 1024 an agent with a few dozen peers
//! runs out. The engine raises the soft limit to the hard limit once per process, as servers
//! commonly do: the hard limit is the administrator's bound, the soft one only a default.

use std::sync::Once;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, once per process. A refusal is logged and
/// otherwise ignored: the engine still works up to the old limit, and a socket refused for it
/// reports the limit (see `Error::io`).
pub fn raise_once() {
    static RAISED: Once = Once::new();
    RAISED.call_once(|| {
        let Some((soft, hard)) = crate::error::open_file_limit() else { return };
        if soft >= hard {
            return;
        }
        let raised = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: `raised` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            log::info!("open-file limit raised from {soft} to the hard limit {hard}");
        } else {
            log::warn!("cannot raise the open-file limit from {soft} to {hard}: {}", std::io::Error::last_os_error());
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        super::raise_once();
        let (soft, hard) = crate::error::open_file_limit().expect("getrlimit");
        assert_eq!(soft, hard);
    }
}
