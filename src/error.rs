//! One error type for the whole crate: a status (the number a C caller sees) plus a message (the text
//! `uccl_engine_last_error` returns).

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

    pub fn describe(self) -> &'static str {
        match self {
            UcclStatus::InProgress => "in progress",
            UcclStatus::Ok => "success",
            UcclStatus::ErrNotPosted => "not posted",
            UcclStatus::ErrInvalidParam => "invalid parameter",
            UcclStatus::ErrBackend => "transport error",
            UcclStatus::ErrNotFound => "not found",
            UcclStatus::ErrMismatch => "size mismatch",
            UcclStatus::ErrNotAllowed => "not allowed",
            UcclStatus::ErrRepostActive => "repost of an active request",
            UcclStatus::ErrUnknown => "unknown error",
            UcclStatus::ErrNotSupported => "not supported",
            UcclStatus::ErrRemoteDisconnect => "remote disconnected",
            UcclStatus::ErrCanceled => "canceled",
            UcclStatus::ErrTimeout => "timed out",
            UcclStatus::ErrInternal => "internal error",
        }
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

impl From<crate::proto::ProtoError> for Error {
    fn from(err: crate::proto::ProtoError) -> Error {
        Error::new(UcclStatus::ErrBackend, format!("protocol violation: {err}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
