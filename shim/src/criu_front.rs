//! The CRIU front: this binary run as `containerd-shim-criu-v2 swrk <fd>`.
//!
//! runc stays the OCI runtime for checkpoint and restore, so a restored
//! container is runc's own (exec, kill, pause, update, delete and a later
//! checkpoint all work). runc is pointed at this binary with `runc --criu`;
//! it speaks CRIU's RPC to us, and we relay every request to the real CRIU
//! through criu-sys, the project's only CRIU client. On the way we:
//! - re-home the descriptors runc names (images/work dirs are runc's fds,
//!   reached through /proc/<runc>/fd; stdio handed over as fds 0-2 move out
//!   of the way of CRIU's own stdio);
//! - add what runc does not expose, from environment variables the shim
//!   sets on runc: a deadline per request, `leave_stopped` at restore (so
//!   Create restores and Start resumes); TCP handling for services under
//!   load (in-flight connections skipped and established ones dumped; at
//!   restore, established ones restored, or closed when the container joins
//!   a pod's new network namespace and its old address is gone);
//! - bring the loopback device up in a restored network namespace;
//! - time the dump (how long the tasks stayed frozen) into the work dir.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::messages::{FailureKind, FileMessage, FrontFailure, FrontStats};

use criu_sys::rpc::{CriuReq, CriuReqType, CriuResp};
use criu_sys::{Action, Criu, NetworkLock, Notification, Options, ServiceSocket};

/// Environment the shim sets for runc, read here.
pub mod env {
    /// The real CRIU binary.
    pub const REAL_CRIU: &str = "CRIU_SHIM_REAL_CRIU";
    /// Deadline of one CRIU request, in seconds.
    pub const TIMEOUT: &str = "CRIU_SHIM_FRONT_TIMEOUT";
    /// "1": restore leaves the tasks stopped (the shim resumes them at Start).
    pub const LEAVE_STOPPED: &str = "CRIU_SHIM_FRONT_LEAVE_STOPPED";
    /// "1": restore established TCP connections.
    pub const TCP_ESTABLISHED: &str = "CRIU_SHIM_FRONT_TCP_ESTABLISHED";
    /// "1": a dump leaves the tasks stopped, neither running nor killed
    /// (the shim kills them once the archive is published, or resumes them
    /// if publishing fails).
    pub const DUMP_LEAVE_STOPPED: &str = "CRIU_SHIM_FRONT_DUMP_LEAVE_STOPPED";
    /// `nftables` or `iptables`: how CRIU locks the network (runc cannot
    /// say; CRIU's default is iptables).
    pub const NETWORK_LOCK: &str = "CRIU_SHIM_FRONT_NETWORK_LOCK";
}

pub fn main(args: &[String]) -> ! {
    // CRIU writes images (memory, environment, credentials) and logs with
    // the umask it inherits: only their owner may read them. This process
    // runs only CRIU; containers never inherit it.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let code = match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("criu-shim CRIU front: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn run(args: &[String]) -> Result<(), String> {
    let fd: RawFd = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .ok_or("usage: swrk <fd>")?;
    // SAFETY: runc hands us this descriptor as `swrk <fd>`; nothing else owns it.
    let sock_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let peer = peer_pid(&sock_fd)?;
    let sock = ServiceSocket::new(sock_fd);
    let real = std::env::var(env::REAL_CRIU)
        .unwrap_or_else(|_| criu_shim_config::DEFAULT_CRIU.to_string());
    let mut criu = Criu::new(real);
    if let Some(secs) = std::env::var(env::TIMEOUT)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        criu = criu.deadline(Duration::from_secs(secs));
    }
    while let Some((req, _fds)) = sock.recv_request().map_err(|e| e.to_string())? {
        let keep_open = req.keep_open();
        let resp = handle(&criu, &sock, peer, req);
        sock.send_response(&resp, None).map_err(|e| e.to_string())?;
        if !keep_open {
            break;
        }
    }
    Ok(())
}

fn handle(criu: &Criu, sock: &ServiceSocket, peer: i32, req: CriuReq) -> CriuResp {
    let req_type = req.type_();
    let result = match req_type {
        CriuReqType::DUMP | CriuReqType::PRE_DUMP | CriuReqType::RESTORE => {
            relay_with_options(criu, sock, peer, req)
        }
        _ => criu.request(req, None, None).map_err(|e| e.into()),
    };
    result.unwrap_or_else(|e: FrontError| failure(req_type, e))
}

struct FrontError {
    errno: Option<i32>,
    message: String,
}

impl From<criu_sys::Error> for FrontError {
    fn from(e: criu_sys::Error) -> Self {
        FrontError {
            errno: e.criu_errno(),
            message: e.to_string(),
        }
    }
}

fn failure(req_type: CriuReqType, e: FrontError) -> CriuResp {
    let mut resp = CriuResp::new();
    resp.set_type(req_type);
    resp.set_success(false);
    if let Some(errno) = e.errno {
        resp.set_cr_errno(errno);
    }
    resp.set_cr_errmsg(e.message);
    resp
}

fn relay_with_options(
    criu: &Criu,
    sock: &ServiceSocket,
    peer: i32,
    mut req: CriuReq,
) -> Result<CriuResp, FrontError> {
    let restore = req.type_() == CriuReqType::RESTORE;
    let raw = req.opts.take().unwrap_or_default();
    let (mut opts, work_dir) = rehome_descriptors(raw, peer)?;
    if restore && flag(env::LEAVE_STOPPED) {
        opts = opts.leave_stopped(true);
    }
    if restore && flag(env::TCP_ESTABLISHED) {
        opts = if joins_existing_netns(&opts) {
            // A pod's network namespace is the new pod's, with a new IP:
            // connections to the old address cannot live on. They come
            // back closed, and the application sees them reset.
            opts.tcp_close(true)
        } else {
            opts.tcp_established(true)
        };
    }
    if !restore {
        // A service under load always has connections in some state when
        // it is frozen. Not yet accepted ones are dropped (their clients
        // retry); established ones are dumped, to be restored or closed.
        opts = opts.tcp_skip_in_flight(true).tcp_established(true);
    }
    if let Some(method) = std::env::var(env::NETWORK_LOCK)
        .ok()
        .and_then(|v| criu_shim_config::NetworkLock::parse(&v))
    {
        opts = opts.network_lock(match method {
            criu_shim_config::NetworkLock::Iptables => NetworkLock::Iptables,
            criu_shim_config::NetworkLock::Nftables => NetworkLock::Nftables,
        });
    }
    if !restore && flag(env::DUMP_LEAVE_STOPPED) {
        opts.raw_mut().set_leave_running(false);
        opts = opts.leave_stopped(true);
    }
    let mut relay = Relay {
        sock,
        frozen_at: None,
        frozen_for: None,
    };
    let started = Instant::now();
    let result = criu.request(req, Some(&opts), Some(&mut relay));
    if let Some(dir) = &work_dir {
        FrontStats {
            criu_ms: started.elapsed().as_secs_f64() * 1000.0,
            frozen_ms: relay.frozen_for.map(|d| d.as_secs_f64() * 1000.0),
            error: result.as_ref().err().map(|e| FrontFailure {
                kind: FailureKind::of(e),
                message: e.to_string(),
            }),
        }
        .write(dir)
        .unwrap_or_else(|e| eprintln!("criu-shim CRIU front: cannot leave its stats: {e}"));
    }
    Ok(result?)
}

/// runc restores into a namespace that already exists (a pod's) by
/// handing CRIU the namespace as the inherited fd `extRootNetNS`.
fn joins_existing_netns(opts: &Options) -> bool {
    opts.raw()
        .inherit_fd
        .iter()
        .any(|f| f.key() == "extRootNetNS")
}

fn flag(name: &str) -> bool {
    std::env::var(name).map(|v| v == "1").unwrap_or(false)
}

/// Makes every descriptor the options name valid in this process, where
/// the real CRIU (our child, our peer) will look for them.
fn rehome_descriptors(
    mut raw: criu_sys::rpc::CriuOpts,
    peer: i32,
) -> Result<(Options, Option<std::path::PathBuf>), FrontError> {
    let mut keep = Vec::new();
    // CRIU reaches images/work dirs through /proc/<peer>/fd/N: runc's fds.
    let images = open_peer_fd(peer, raw.images_dir_fd())?;
    raw.set_images_dir_fd(images.as_raw_fd());
    keep.push(images);
    let mut work_dir = None;
    if raw.has_work_dir_fd() {
        let work = open_peer_fd(peer, raw.work_dir_fd())?;
        work_dir = std::fs::read_link(format!("/proc/self/fd/{}", work.as_raw_fd())).ok();
        raw.set_work_dir_fd(work.as_raw_fd());
        keep.push(work);
    }
    // inherit_fd numbers are ours (runc passed them to us). Those on 0-2
    // would collide with CRIU's own stdio: move them up.
    let mut inherited = Vec::new();
    for inh in raw.inherit_fd.iter_mut() {
        let fd = inh.fd();
        let owned = if fd <= 2 {
            let moved = nix::fcntl::fcntl(
                // SAFETY: fd 0-2 are open for the duration of this call.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10),
            )
            .map_err(|e| FrontError {
                errno: Some(e as i32),
                message: format!("dup inherited fd {fd}: {e}"),
            })?;
            // SAFETY: a fresh descriptor from F_DUPFD.
            unsafe { OwnedFd::from_raw_fd(moved) }
        } else {
            // SAFETY: runc handed this fd to us for CRIU; we are its only user.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        inh.set_fd(owned.as_raw_fd());
        inherited.push(owned);
    }
    let mut opts = Options::from_rpc(raw);
    for fd in keep {
        opts = opts.own_fd(fd);
    }
    for fd in inherited {
        opts = opts.own_inherited_fd(fd);
    }
    Ok((opts, work_dir))
}

fn open_peer_fd(peer: i32, fd: i32) -> Result<OwnedFd, FrontError> {
    let path = format!("/proc/{peer}/fd/{fd}");
    nix::fcntl::open(
        path.as_str(),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| FrontError {
        errno: Some(e as i32),
        message: format!("open {path} (a directory runc passed to CRIU): {e}"),
    })
}

fn peer_pid(sock: &OwnedFd) -> Result<i32, String> {
    let cred = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("SO_PEERCRED on the swrk socket: {e}"))?;
    Ok(cred.pid())
}

/// Forwards CRIU's notifications to runc and runc's verdicts back.
struct Relay<'a> {
    sock: &'a ServiceSocket,
    frozen_at: Option<Instant>,
    frozen_for: Option<Duration>,
}

impl criu_sys::Notify for Relay<'_> {
    fn notify(&mut self, n: &mut Notification) -> Result<(), String> {
        match n.action {
            Action::PreDump => self.frozen_at = Some(Instant::now()),
            Action::PostDump => self.frozen_for = self.frozen_at.map(|t| t.elapsed()),
            Action::SetupNamespaces | Action::PostRestore => {
                if let Some(pid) = n.pid {
                    if let Err(e) = crate::netfix::loopback_up(pid) {
                        log::warn!("bring up lo of restored pid {pid}: {e}");
                    }
                }
            }
            _ => {}
        }
        let mut msg = CriuResp::new();
        msg.set_type(CriuReqType::NOTIFY);
        msg.set_success(true);
        let notify = msg.notify.mut_or_insert_default();
        notify.set_script(n.action.as_str().to_string());
        if let Some(pid) = n.pid {
            notify.set_pid(pid);
        }
        use std::os::fd::AsFd;
        self.sock
            .send_response(&msg, n.fd.as_ref().map(|f| f.as_fd()))
            .map_err(|e| e.to_string())?;
        match self.sock.recv_request().map_err(|e| e.to_string())? {
            Some((reply, _)) if reply.type_() == CriuReqType::NOTIFY => {
                if reply.notify_success() {
                    Ok(())
                } else {
                    Err(format!("runc refused '{}'", n.action))
                }
            }
            Some((other, _)) => Err(format!(
                "runc answered '{}' with {:?}",
                n.action,
                other.type_()
            )),
            None => Err("runc went away".into()),
        }
    }
}
