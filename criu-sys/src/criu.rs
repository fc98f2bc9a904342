//! The client: one method per request type. Each request runs in its own
//! `criu swrk` process (as runc does), so a crashed or killed CRIU never
//! poisons the next request.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{CriuFailure, Error, Request, Result};
use crate::notify::{AcceptAll, Action, Notification, Notify};
use crate::options::Options;
use crate::reaper::{Reaper, WaitPid};
use crate::rpc::{self, CriuReq, CriuReqType, CriuResp};
use crate::transport::{Received, Session};
use crate::version::{Version, VersionInfo};
use crate::MAX_LOG_ERRORS;

/// What this kernel and CRIU can do beyond a plain dump and restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// Dirty-memory tracking: pre-dump and iterative migration.
    pub mem_track: bool,
    /// userfaultfd-based lazy restore (post-copy).
    pub lazy_pages: bool,
    /// Pidfd store (pid reuse detection across pre-dumps).
    pub pidfd_store: bool,
}

/// A started page server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageServer {
    pub pid: i32,
    pub port: u16,
}

/// A handle on one CRIU binary. Cheap to clone.
#[derive(Clone)]
pub struct Criu {
    binary: PathBuf,
    reaper: Arc<dyn Reaper>,
    deadline: Option<Duration>,
    version: Arc<OnceLock<VersionInfo>>,
}

impl std::fmt::Debug for Criu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Criu")
            .field("binary", &self.binary)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Criu {
    /// `binary` is a path, or a bare name looked up in PATH.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Criu {
            binary: binary.into(),
            reaper: Arc::new(WaitPid),
            deadline: None,
            version: Arc::new(OnceLock::new()),
        }
    }

    /// How the exit status of the CRIU child is collected (see [`crate::reaper`]).
    pub fn with_reaper(mut self, reaper: Arc<dyn Reaper>) -> Self {
        self.reaper = reaper;
        self
    }

    /// The longest any one request may take. Past it, CRIU is killed and the
    /// request fails with [`Error::Timeout`]; a dump's tree keeps running
    /// (CRIU's ptrace hold ends with CRIU; a freezer cgroup given with
    /// `freeze_cgroup` must be thawed by the caller).
    pub fn deadline(mut self, limit: Duration) -> Self {
        self.deadline = Some(limit);
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// CRIU's version (asked once per handle, then cached).
    pub fn version(&self) -> Result<VersionInfo> {
        if let Some(v) = self.version.get() {
            return Ok(v.clone());
        }
        let resp = self.call(Request::Version, request(CriuReqType::VERSION), None, None)?;
        let v = resp
            .version
            .as_ref()
            .ok_or_else(|| Error::Protocol("VERSION reply without a version".into()))?;
        let info = VersionInfo {
            version: Version::from_rpc(v),
            gitid: v.gitid.clone().filter(|g| !g.is_empty()),
            name: v.name.clone().filter(|n| !n.is_empty()),
        };
        let _ = self.version.set(info.clone());
        Ok(info)
    }

    /// Fails unless CRIU is at least `min`.
    pub fn require_version(&self, feature: &'static str, min: Version) -> Result<()> {
        let found = self.version()?.version;
        if found < min {
            return Err(Error::TooOld {
                feature,
                needed: min,
                found,
            });
        }
        Ok(())
    }

    /// `criu check`: can CRIU checkpoint and restore on this kernel?
    pub fn check(&self) -> Result<()> {
        self.call(Request::Check, request(CriuReqType::CHECK), None, None)
            .map(drop)
    }

    /// Which optional features this kernel and CRIU have. Never fails just
    /// because a feature is missing.
    pub fn feature_check(&self) -> Result<Features> {
        let mut req = request(CriuReqType::FEATURE_CHECK);
        let mut ask = rpc::CriuFeatures::new();
        ask.set_mem_track(true);
        ask.set_lazy_pages(true);
        ask.set_pidfd_store(true);
        req.features = Some(ask).into();
        // CRIU answers a feature check with success=false when a feature is
        // missing on some versions; the features field is what counts.
        let resp = match self.call(Request::FeatureCheck, req, None, None) {
            Ok(resp) => resp,
            Err(Error::Criu { .. }) => return Ok(Features::default()),
            Err(e) => return Err(e),
        };
        let f = resp.features.as_ref();
        Ok(Features {
            mem_track: f.map(|f| f.mem_track()).unwrap_or(false),
            lazy_pages: f.map(|f| f.lazy_pages()).unwrap_or(false),
            pidfd_store: f.map(|f| f.pidfd_store()).unwrap_or(false),
        })
    }

    /// Dumps the tree rooted at `opts.pid`.
    pub fn dump(&self, opts: &Options, notify: Option<&mut dyn Notify>) -> Result<()> {
        self.ensure_images_dir(Request::Dump, opts)?;
        if opts.to_rpc().track_mem() {
            self.ensure_mem_track()?;
        }
        self.ensure_version(opts)?;
        self.call(
            Request::Dump,
            with_opts(CriuReqType::DUMP, opts),
            Some(opts),
            notify,
        )
        .map(drop)
    }

    /// Writes the tree's memory and starts tracking what changes, so a later
    /// dump with `parent_img` only copies dirty pages. Needs kernel support
    /// for soft-dirty tracking.
    pub fn pre_dump(&self, opts: &Options, notify: Option<&mut dyn Notify>) -> Result<()> {
        self.ensure_images_dir(Request::PreDump, opts)?;
        self.ensure_mem_track()?;
        self.ensure_version(opts)?;
        self.call(
            Request::PreDump,
            with_opts(CriuReqType::PRE_DUMP, opts),
            Some(opts),
            notify,
        )
        .map(drop)
    }

    /// Restores a tree from `opts`' images dir and returns its root pid
    /// (as seen from the caller's pid namespace).
    pub fn restore(&self, opts: &Options, notify: Option<&mut dyn Notify>) -> Result<i32> {
        self.ensure_images_dir(Request::Restore, opts)?;
        self.ensure_version(opts)?;
        let resp = self.call(
            Request::Restore,
            with_opts(CriuReqType::RESTORE, opts),
            Some(opts),
            notify,
        )?;
        resp.restore
            .as_ref()
            .map(|r| r.pid())
            .ok_or_else(|| Error::Protocol("RESTORE reply without a pid".into()))
    }

    /// Starts a page server (it runs on after this returns).
    pub fn page_server(&self, opts: &Options) -> Result<PageServer> {
        self.ensure_images_dir(Request::PageServer, opts)?;
        self.ensure_version(opts)?;
        let resp = self.call(
            Request::PageServer,
            with_opts(CriuReqType::PAGE_SERVER, opts),
            Some(opts),
            None,
        )?;
        let ps = resp
            .ps
            .as_ref()
            .ok_or_else(|| Error::Protocol("PAGE_SERVER reply without server info".into()))?;
        Ok(PageServer {
            pid: ps.pid(),
            port: u16::try_from(ps.port())
                .map_err(|_| Error::Protocol(format!("page server port {}", ps.port())))?,
        })
    }

    /// Any request, as a relay forwards it. `opts`, when given, replaces the
    /// request's options (and carries the descriptors they name). The reply
    /// comes back as CRIU sent it when it succeeded; failures are typed
    /// errors as usual.
    pub fn request(
        &self,
        mut req: CriuReq,
        opts: Option<&Options>,
        notify: Option<&mut dyn Notify>,
    ) -> Result<CriuResp> {
        let kind = match req.type_() {
            CriuReqType::DUMP => Request::Dump,
            CriuReqType::PRE_DUMP | CriuReqType::SINGLE_PRE_DUMP => Request::PreDump,
            CriuReqType::RESTORE => Request::Restore,
            CriuReqType::CHECK => Request::Check,
            CriuReqType::FEATURE_CHECK => Request::FeatureCheck,
            CriuReqType::PAGE_SERVER | CriuReqType::PAGE_SERVER_CHLD => Request::PageServer,
            _ => Request::Version,
        };
        if let Some(o) = opts {
            self.ensure_version(o)?;
            req.opts = Some(o.to_rpc()).into();
        }
        // One request per CRIU process, as for every other call.
        req.clear_keep_open();
        self.call(kind, req, opts, notify)
    }

    fn ensure_images_dir(&self, request: Request, opts: &Options) -> Result<()> {
        if opts.has_images_dir() {
            Ok(())
        } else {
            Err(Error::InvalidOption(format!(
                "{request} needs an images directory (Options::images_dir)"
            )))
        }
    }

    fn ensure_version(&self, opts: &Options) -> Result<()> {
        match opts.required_version() {
            Some((feature, min)) => self.require_version(feature, min),
            None => Ok(()),
        }
    }

    fn ensure_mem_track(&self) -> Result<()> {
        if self.feature_check()?.mem_track {
            return Ok(());
        }
        Err(Error::Unsupported {
            feature: "memory tracking (pre-dump, track_mem)",
            reason: "memory tracking not supported: the kernel has no soft-dirty page \
                     tracking (CONFIG_MEM_SOFT_DIRTY); use a single full dump instead"
                .into(),
        })
    }

    /// Runs one request to completion: sends it, answers notifications,
    /// enforces the deadline, and turns every way it can end into a result.
    fn call(
        &self,
        kind: Request,
        req: CriuReq,
        opts: Option<&Options>,
        notify: Option<&mut dyn Notify>,
    ) -> Result<CriuResp> {
        let mut accept_all = AcceptAll;
        let notify: &mut dyn Notify = notify.unwrap_or(&mut accept_all);
        let inherited = opts.map(|o| o.inherited_fds()).unwrap_or(&[]);
        let logs = LogSource::from_opts(opts);
        let started = Instant::now();
        let deadline = self.deadline.map(|d| started + d);

        let mut session = Session::spawn(&self.binary, self.reaper.as_ref(), inherited)?;
        log::debug!("CRIU {kind}: request sent to pid {}", session.pid());
        session.send(&req)?;
        let expected = req.type_();
        let mut refused: Option<(String, String)> = None;

        loop {
            let received = match session.recv(deadline)? {
                Some(r) => r,
                None => return Err(self.timed_out(kind, &mut session, &logs, started)),
            };
            let (resp, fd) = match received {
                Received::Message(resp, fd) => (resp, fd),
                Received::Eof => {
                    let status = session.finish();
                    let mut failure = logs.failure(&mut session);
                    failure
                        .message
                        .get_or_insert_with(|| "CRIU closed the connection".into());
                    return Err(Error::Died {
                        request: kind,
                        status: status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "exit status unknown".into()),
                        failure,
                    });
                }
            };

            if resp.type_() == CriuReqType::NOTIFY {
                let mut n = Notification {
                    action: Action::from_script(resp.notify.script()),
                    pid: resp.notify.as_ref().map(|n| n.pid()).filter(|p| *p != 0),
                    fd,
                };
                let verdict = notify.notify(&mut n);
                log::debug!("CRIU {kind}: notify {} -> {:?}", n.action, verdict);
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(self.timed_out(kind, &mut session, &logs, started));
                }
                let mut reply = request(CriuReqType::NOTIFY);
                reply.set_notify_success(verdict.is_ok());
                if let Err(reason) = verdict {
                    refused = Some((n.action.to_string(), reason));
                }
                session.send(&reply)?;
                continue;
            }

            if resp.type_() != expected {
                return Err(Error::Protocol(format!(
                    "expected a {expected:?} reply, got {:?}",
                    resp.type_()
                )));
            }
            session.finish();
            if let Some((action, reason)) = refused {
                return Err(Error::NotifyRejected { action, reason });
            }
            if !resp.success() {
                let mut failure = logs.failure(&mut session);
                failure.errno = resp.cr_errno;
                failure.message = resp
                    .cr_errmsg
                    .as_deref()
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty() && !is_benign(m));
                return Err(Error::Criu {
                    request: kind,
                    failure,
                });
            }
            log::debug!("CRIU {kind}: done in {:?}", started.elapsed());
            return Ok(*resp);
        }
    }

    fn timed_out(
        &self,
        kind: Request,
        session: &mut Session,
        logs: &LogSource,
        started: Instant,
    ) -> Error {
        log::warn!(
            "CRIU {kind} exceeded its deadline ({:?}); killing CRIU pid {}",
            started.elapsed(),
            session.pid()
        );
        session.kill();
        session.finish();
        Error::Timeout {
            request: kind,
            after: self.deadline.unwrap_or_default(),
            log_errors: logs.failure(session).log_errors,
        }
    }
}

fn request(t: CriuReqType) -> CriuReq {
    let mut req = CriuReq::new();
    req.set_type(t);
    req
}

fn with_opts(t: CriuReqType, opts: &Options) -> CriuReq {
    let mut req = request(t);
    req.opts = Some(opts.to_rpc()).into();
    req
}

/// Where CRIU's complaints for one request end up.
struct LogSource {
    work_dir_fd: Option<RawFd>,
    log_file: Option<String>,
}

impl LogSource {
    fn from_opts(opts: Option<&Options>) -> Self {
        LogSource {
            work_dir_fd: opts.and_then(|o| o.work_dir_fd()),
            log_file: opts.and_then(|o| o.log_file_name().map(str::to_string)),
        }
    }

    /// The log's real path: the work dir fd resolved through /proc, because
    /// CRIU writes it relative to that descriptor.
    fn log_path(&self) -> Option<PathBuf> {
        let fd = self.work_dir_fd?;
        let name = self.log_file.as_deref()?;
        let dir = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
        Some(dir.join(name))
    }

    fn failure(&self, session: &mut Session) -> CriuFailure {
        let log_path = self.log_path();
        let text = log_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_else(|| session.stderr());
        CriuFailure {
            errno: None,
            message: None,
            log_errors: error_lines(&text),
            log_path: log_path.filter(|p| p.exists()),
        }
    }
}

/// CRIU log errors that CRIU itself recovers from. They would otherwise be
/// the first thing a user reads (and CRIU copies the first error into
/// cr_errmsg), pointing at the wrong cause.
const BENIGN_ERRORS: &[&str] = &[
    // CRIU tries to raise its own fd limit and carries on when it may not
    // (seen as root in VMs that cap RLIMIT_NOFILE).
    "Can't setup RLIMIT_NOFILE for self",
];

fn is_benign(line: &str) -> bool {
    BENIGN_ERRORS.iter().any(|b| line.contains(b))
}

/// The "Error (file:line): ..." lines of a CRIU log, first ones first: the
/// first error is usually the cause, the rest its consequences.
pub(crate) fn error_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Error (") || l.starts_with("Error:"))
        .filter(|l| !is_benign(l))
        .map(|l| {
            // Drop the "(00.012345) " timestamp prefix.
            let l = l.trim();
            match l.find("Error") {
                Some(i) => l[i..].to_string(),
                None => l.to_string(),
            }
        })
        .take(MAX_LOG_ERRORS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_error_lines_from_a_criu_log() {
        let log = "(00.000100) Version: 4.2.1\n\
                   (00.000200) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                   (00.001000) Error (criu/cr-restore.c:1234): Can't open images\n\
                   (00.001100) Warn  (criu/x.c:1): meh\n\
                   (00.001200) Error (criu/cr-restore.c:2000): Restoring FAILED.\n";
        assert_eq!(
            error_lines(log),
            vec![
                "Error (criu/cr-restore.c:1234): Can't open images".to_string(),
                "Error (criu/cr-restore.c:2000): Restoring FAILED.".to_string()
            ]
        );
    }

    #[test]
    fn caps_the_number_of_error_lines() {
        let log = "(0) Error (a.c:1): x\n".repeat(100);
        assert_eq!(error_lines(&log).len(), MAX_LOG_ERRORS);
    }

    #[test]
    fn requests_round_trip_through_the_wire_format() {
        use protobuf::Message;
        let opts = Options::new()
            .pid(7)
            .leave_running(true)
            .notify_scripts(true);
        let req = with_opts(CriuReqType::DUMP, &opts);
        let bytes = req.write_to_bytes().unwrap();
        let back = CriuReq::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back.type_(), CriuReqType::DUMP);
        assert_eq!(back.opts.pid(), 7);
        assert!(back.opts.leave_running());
        assert!(back.opts.notify_scripts());
    }

    #[test]
    fn decodes_a_failed_response_as_criu_sends_it() {
        use protobuf::Message;
        let mut resp = CriuResp::new();
        resp.set_type(CriuReqType::DUMP);
        resp.set_success(false);
        resp.set_cr_errno(libc::ESRCH);
        resp.set_cr_errmsg("No process with such pid".into());
        let back = CriuResp::parse_from_bytes(&resp.write_to_bytes().unwrap()).unwrap();
        assert!(!back.success());
        assert_eq!(back.cr_errno(), libc::ESRCH);
        assert_eq!(back.cr_errmsg(), "No process with such pid");
    }

    #[test]
    fn missing_images_dir_is_a_typed_error() {
        let criu = Criu::new("/nonexistent/criu");
        let err = criu.dump(&Options::new().pid(1), None).unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{err}");
    }

    #[test]
    fn missing_binary_is_reported_before_anything_runs() {
        let err = Criu::new("/nonexistent/criu").version().unwrap_err();
        assert!(matches!(err, Error::BinaryNotFound { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/criu"));
    }
}
