//! One error type for the whole crate: a status (the number a C caller sees) plus a message (the text
//! `uccl_engine_last_error` returns).

use std::ffi::CStr;
use std::fmt;

/// Status numbers follow NIXL's `nixl_status_t` so that a NIXL backend can pass them through unchanged.
/// -12 and -13 are left unused because some NIXL versions give them other meanings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UcclStatus {
    InProgress = 1,
    Ok = 0,
    ErrNotPosted = -1,
    ErrInvalidParam = -2,
    ErrBackend = -3,
    ErrNotFound = -4,
    ErrMismatch = -5,
    ErrNotAllowed = -6,
    ErrRepostActive = -7,
    ErrUnknown = -8,
    ErrNotSupported = -9,
    ErrRemoteDisconnect = -10,
    ErrCanceled = -11,
    ErrTimeout = -14,
    ErrInternal = -15,
}

impl UcclStatus {
    const ALL: [UcclStatus; 15] = [
        UcclStatus::InProgress,
        UcclStatus::Ok,
        UcclStatus::ErrNotPosted,
        UcclStatus::ErrInvalidParam,
        UcclStatus::ErrBackend,
        UcclStatus::ErrNotFound,
        UcclStatus::ErrMismatch,
        UcclStatus::ErrNotAllowed,
        UcclStatus::ErrRepostActive,
        UcclStatus::ErrUnknown,
        UcclStatus::ErrNotSupported,
        UcclStatus::ErrRemoteDisconnect,
        UcclStatus::ErrCanceled,
        UcclStatus::ErrTimeout,
        UcclStatus::ErrInternal,
    ];

    pub fn from_code(code: i32) -> Option<UcclStatus> {
        Self::ALL.into_iter().find(|s| *s as i32 == code)
    }

    /// The status as `uccl_engine_status_str` gives it to C: the header's name for it, then what it
    /// means. The one table of status texts; [`describe`](Self::describe) is the meaning alone.
    pub fn c_text(self) -> &'static CStr {
        match self {
            UcclStatus::InProgress => c"UCCL_STATUS_IN_PROGRESS: in progress",
            UcclStatus::Ok => c"UCCL_STATUS_OK: success",
            UcclStatus::ErrNotPosted => c"UCCL_STATUS_ERR_NOT_POSTED: not posted",
            UcclStatus::ErrInvalidParam => c"UCCL_STATUS_ERR_INVALID_PARAM: invalid parameter",
            UcclStatus::ErrBackend => c"UCCL_STATUS_ERR_BACKEND: transport error",
            UcclStatus::ErrNotFound => c"UCCL_STATUS_ERR_NOT_FOUND: not found",
            UcclStatus::ErrMismatch => c"UCCL_STATUS_ERR_MISMATCH: size mismatch",
            UcclStatus::ErrNotAllowed => c"UCCL_STATUS_ERR_NOT_ALLOWED: not allowed",
            UcclStatus::ErrRepostActive => c"UCCL_STATUS_ERR_REPOST_ACTIVE: repost of an active request",
            UcclStatus::ErrUnknown => c"UCCL_STATUS_ERR_UNKNOWN: unknown error",
            UcclStatus::ErrNotSupported => c"UCCL_STATUS_ERR_NOT_SUPPORTED: not supported",
            UcclStatus::ErrRemoteDisconnect => c"UCCL_STATUS_ERR_REMOTE_DISCONNECT: remote disconnected",
            UcclStatus::ErrCanceled => c"UCCL_STATUS_ERR_CANCELED: canceled",
            UcclStatus::ErrTimeout => c"UCCL_STATUS_ERR_TIMEOUT: timed out",
            UcclStatus::ErrInternal => c"UCCL_STATUS_ERR_INTERNAL: internal error",
        }
    }

    /// The header's name for the status ("UCCL_STATUS_ERR_TIMEOUT").
    pub fn name(self) -> &'static str {
        let text = self.c_text().to_str().unwrap_or_default();
        text.split_once(": ").map_or(text, |(name, _)| name)
    }

    /// What the status means ("timed out"), for messages.
    pub fn describe(self) -> &'static str {
        let text = self.c_text().to_str().unwrap_or_default();
        text.split_once(": ").map_or(text, |(_, meaning)| meaning)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    status: UcclStatus,
    message: String,
}

impl Error {
    pub fn new(status: UcclStatus, message: impl Into<String>) -> Error {
        debug_assert!((status as i32) < 0, "errors carry negative statuses");
        Error { status, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(UcclStatus::ErrInvalidParam, message)
    }
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(UcclStatus::ErrNotFound, message)
    }
    pub fn not_allowed(message: impl Into<String>) -> Error {
        Error::new(UcclStatus::ErrNotAllowed, message)
    }
    pub fn backend(message: impl Into<String>) -> Error {
        Error::new(UcclStatus::ErrBackend, message)
    }
    pub fn disconnected(message: impl Into<String>) -> Error {
        Error::new(UcclStatus::ErrRemoteDisconnect, message)
    }
    pub fn timeout(message: impl Into<String>) -> Error {
        Error::new(UcclStatus::ErrTimeout, message)
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(UcclStatus::ErrInternal, message)
    }

    pub fn status(&self) -> UcclStatus {
        self.status
    }
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes context while keeping the status, e.g. "connect to 10.0.0.2:5000: ...".
    pub fn context(self, what: impl fmt::Display) -> Error {
        Error { status: self.status, message: format!("{what}: {}", self.message) }
    }

    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Error {
        use std::io::ErrorKind as K;
        let status = match err.kind() {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof | K::NotConnected => {
                UcclStatus::ErrRemoteDisconnect
            }
            K::TimedOut | K::WouldBlock => UcclStatus::ErrTimeout,
            _ => UcclStatus::ErrBackend,
        };
        let hint = match err.raw_os_error() {
            Some(libc::EMFILE) => match open_file_limit() {
                Some((soft, hard)) => {
                    format!(" (the process's open-file limit is reached: RLIMIT_NOFILE soft {soft}, hard {hard})")
                }
                None => " (the process's open-file limit is reached)".to_string(),
            },
            Some(libc::ENFILE) => " (the system's open-file table is full)".to_string(),
            // A socket's retransmissions (or TCP_USER_TIMEOUT, which the engine sets to its stall
            // timeout) ran out: nothing came back from the peer's host, not even an acknowledgement.
            Some(libc::ETIMEDOUT) => " (the peer is unreachable: its host acknowledged nothing in time)".to_string(),
            _ => String::new(),
        };
        Error::new(status, format!("{what}: {err}{hint}"))
    }
}

/// The process's `RLIMIT_NOFILE` as (soft, hard), or `None` where the kernel does not say.
pub(crate) fn open_file_limit() -> Option<(libc::rlim_t, libc::rlim_t)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a writable rlimit that outlives the call.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status.describe())
    }
}

impl std::error::Error for Error {}

#[doc(hidden)]
impl From<crate::proto::ProtoError> for Error {
    fn from(err: crate::proto::ProtoError) -> Error {
        Error::new(UcclStatus::ErrBackend, format!("protocol violation: {err}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::UcclStatus;

    /// The statuses the checked-in header declares, as (C name, value).
    fn header_statuses() -> Vec<(String, i32)> {
        // Embedded at build time, so the test also runs from a bundle copied to a host without the tree.
        let header = include_str!("../include/uccl_engine.h");
        let body = header.split("enum UcclStatus").nth(1).and_then(|rest| rest.split('}').next()).unwrap();
        body.lines()
            .filter_map(|line| {
                let (name, value) = line.trim().trim_end_matches(',').split_once(" = ")?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn every_status_has_one_text_that_starts_with_its_header_name() {
        let declared = header_statuses();
        assert_eq!(declared.len(), UcclStatus::ALL.len(), "{declared:?}");
        let mut texts = std::collections::HashSet::new();
        for (name, value) in &declared {
            let status = UcclStatus::from_code(*value).unwrap_or_else(|| panic!("{name} = {value} is unknown"));
            let text = status.c_text().to_str().unwrap();
            assert_eq!(text.split_once(": ").map(|(n, _)| n), Some(name.as_str()), "{text}");
            assert!(!status.describe().is_empty() && !status.describe().contains(':'), "{text}");
            assert!(texts.insert(status.describe()), "two statuses read {:?}", status.describe());
        }
    }

    #[test]
    fn a_socket_that_timed_out_names_an_unreachable_peer() {
        let e = super::Error::io("control stream", std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
        assert_eq!(e.status(), UcclStatus::ErrTimeout);
        assert!(e.message().starts_with("control stream: ") && e.message().contains("peer is unreachable"), "{e}");
        let reset = super::Error::io("control stream", std::io::Error::from_raw_os_error(libc::ECONNRESET));
        assert!(!reset.message().contains("unreachable"), "{reset}");
    }
}
