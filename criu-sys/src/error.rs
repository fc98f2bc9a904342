//! Typed errors. Every failure that comes from CRIU carries CRIU's own words
//! (errno, `cr_errmsg`, and the `Error` lines of its log) because "dump failed"
//! alone sends the operator hunting through a work directory that the caller
//! has usually deleted by then.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::version::Version;

/// The request a failure belongs to, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Version,
    Check,
    FeatureCheck,
    Dump,
    PreDump,
    Restore,
    PageServer,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Request::Version => "version",
            Request::Check => "check",
            Request::FeatureCheck => "feature check",
            Request::Dump => "dump",
            Request::PreDump => "pre-dump",
            Request::Restore => "restore",
            Request::PageServer => "page-server",
        })
    }
}

/// What CRIU itself said about a failed request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriuFailure {
    /// `cr_errno` from the response, when CRIU set one.
    pub errno: Option<i32>,
    /// `cr_errmsg` from the response, when CRIU set one.
    pub message: Option<String>,
    /// The `Error (...)` lines of CRIU's log file, oldest first (at most
    /// [`crate::MAX_LOG_ERRORS`]).
    pub log_errors: Vec<String>,
    /// Where the full log is, if it was written.
    pub log_path: Option<PathBuf>,
}

impl fmt::Display for CriuFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = false;
        if let Some(msg) = self.message.as_deref().filter(|m| !m.is_empty()) {
            write!(f, "{msg}")?;
            said = true;
        }
        if let Some(errno) = self.errno.filter(|e| *e != 0) {
            let sep = if said { " " } else { "" };
            let desc = nix::errno::Errno::from_raw(errno).desc();
            write!(f, "{sep}(errno {errno}: {desc})")?;
            said = true;
        }
        // cr_errmsg is usually the first log error: do not say it twice.
        let rest: Vec<&str> = self
            .log_errors
            .iter()
            .map(String::as_str)
            .filter(|l| Some(*l) != self.message.as_deref())
            .collect();
        if !rest.is_empty() {
            let sep = if said { "; " } else { "" };
            write!(f, "{sep}CRIU log: {}", rest.join(" | "))?;
            said = true;
        }
        if !said {
            f.write_str("CRIU gave no reason")?;
        }
        if let Some(path) = &self.log_path {
            write!(f, " (full log: {})", path.display())?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CRIU binary not found at {path}: install CRIU >= {min} or set the CRIU path", min = crate::MIN_VERSION)]
    BinaryNotFound { path: PathBuf },

    #[error("cannot start CRIU ({path} swrk): {source}")]
    Spawn { path: PathBuf, source: io::Error },

    #[error("CRIU {request} failed: {failure}")]
    Criu {
        request: Request,
        failure: CriuFailure,
    },

    #[error(
        "CRIU {found} is too old for {feature}: it needs CRIU >= {needed}; install a newer CRIU"
    )]
    TooOld {
        feature: &'static str,
        needed: Version,
        found: Version,
    },

    #[error("{feature} is not supported by this kernel/CRIU: {reason}")]
    Unsupported {
        feature: &'static str,
        reason: String,
    },

    #[error("CRIU {request} did not finish within {after:?}; CRIU was stopped{}", 
        .log_errors.first().map(|l| format!(" (CRIU log: {l})")).unwrap_or_default())]
    Timeout {
        request: Request,
        after: Duration,
        log_errors: Vec<String>,
    },

    #[error("notification '{action}' was refused by the caller: {reason}")]
    NotifyRejected { action: String, reason: String },

    #[error("CRIU {request} exited without answering ({status}){}",
        .failure.log_errors.first().map(|l| format!("; CRIU log: {l}")).unwrap_or_default())]
    Died {
        request: Request,
        status: String,
        failure: CriuFailure,
    },

    #[error("malformed message from CRIU: {0}")]
    Protocol(String),

    #[error("invalid option: {0}")]
    InvalidOption(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// CRIU's errno for this failure, when it gave one.
    pub fn criu_errno(&self) -> Option<i32> {
        match self {
            Error::Criu { failure, .. } | Error::Died { failure, .. } => failure.errno,
            _ => None,
        }
    }

    /// CRIU's own explanation (cr_errmsg and log errors), when there is one.
    pub fn criu_failure(&self) -> Option<&CriuFailure> {
        match self {
            Error::Criu { failure, .. } | Error::Died { failure, .. } => Some(failure),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_message_names_criu_reason_errno_and_log() {
        let f = CriuFailure {
            errno: Some(libc::ESRCH),
            message: Some("Can't seize 4242".into()),
            log_errors: vec!["Error (compel/src/lib/infect.c:1): seize failed".into()],
            log_path: Some("/tmp/w/dump.log".into()),
        };
        let text = Error::Criu {
            request: Request::Dump,
            failure: f,
        }
        .to_string();
        assert!(
            text.starts_with("CRIU dump failed: Can't seize 4242 (errno 3"),
            "{text}"
        );
        assert!(text.contains("seize failed"), "{text}");
        assert!(text.contains("/tmp/w/dump.log"), "{text}");
    }

    #[test]
    fn empty_failure_says_so() {
        assert_eq!(CriuFailure::default().to_string(), "CRIU gave no reason");
    }
}
