//! Errors of the shim, and how each maps to a ttrpc status code, so that
//! containerd (and `ctr`, and the kubelet) see the same errdefs classes as
//! with containerd's own runc shim: a kill of an exited process is
//! NotFound, a second create of the same id is AlreadyExists, and so on.

use containerd_shim::protos::ttrpc::{self, Code};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("runc {op} failed: {message}")]
    Runc { op: &'static str, message: String },
    #[error(transparent)]
    Criu(#[from] criu_sys::Error),
    #[error(transparent)]
    Config(#[from] criu_shim_config::ConfigError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What the archive's writer thread reports (the share's errors).
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::io_or_full(
            "write the archive",
            e,
            "the share (or staging disk) is full; free space and retry",
        )
    }
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An I/O error, except that a full disk (ENOSPC) says so and what the
    /// user must do about it (`fix`).
    pub fn io_or_full(context: impl Into<String>, source: std::io::Error, fix: &str) -> Self {
        let context = context.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            Error::Other(format!("no space left: {context}: {fix}"))
        } else {
            Error::io(context, source)
        }
    }

    /// The same error (and code) with `note` added to its message.
    pub fn with_note(self, note: &str) -> Self {
        let add = |m: String| format!("{m} ({note})");
        match self {
            Error::NotFound(m) => Error::NotFound(add(m)),
            Error::AlreadyExists(m) => Error::AlreadyExists(add(m)),
            Error::InvalidArgument(m) => Error::InvalidArgument(add(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(add(m)),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(add(m)),
            Error::Other(m) => Error::Other(add(m)),
            other => Error::Other(add(other.to_string())),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) | Error::Config(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Error::Criu(criu_sys::Error::Timeout { .. }) => Code::DEADLINE_EXCEEDED,
            Error::Criu(criu_sys::Error::BinaryNotFound { .. })
            | Error::Criu(criu_sys::Error::TooOld { .. })
            | Error::Criu(criu_sys::Error::Unsupported { .. }) => Code::FAILED_PRECONDITION,
            Error::Runc { .. } | Error::Criu(_) | Error::Io { .. } | Error::Other(_) => {
                Code::UNKNOWN
            }
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        log::warn!("request failed: {e}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_containerd_errdefs() {
        assert_eq!(Error::NotFound("x".into()).code(), Code::NOT_FOUND);
        assert_eq!(
            Error::AlreadyExists("x".into()).code(),
            Code::ALREADY_EXISTS
        );
        let t = Error::Criu(criu_sys::Error::Timeout {
            request: criu_sys::Request::Dump,
            after: std::time::Duration::from_secs(1),
            log_errors: vec![],
        });
        assert_eq!(t.code(), Code::DEADLINE_EXCEEDED);
        match ttrpc::Error::from(Error::NotFound("process gone".into())) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert_eq!(s.message(), "process gone");
            }
            other => panic!("{other:?}"),
        }
    }
}
