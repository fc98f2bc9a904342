//! One `criu swrk` child and the SOCK_SEQPACKET socket we talk to it over.
//!
//! Why each detail is the way it is:
//! - Our end of the socketpair is close-on-exec, so no other child of a
//!   busy, multi-threaded shim inherits it; CRIU's end and the fds CRIU must
//!   inherit lose close-on-exec only inside the forked child, never in the
//!   parent where another thread could fork at the same moment.
//! - The child's signal mask is emptied and SIGCHLD/SIGPIPE reset: CRIU waits
//!   for the tasks it forks at restore with SIGCHLD, and a mask inherited from
//!   a shim thread would make restore hang.
//! - Replies are sized with MSG_PEEK|MSG_TRUNC, so no message is ever cut
//!   short by a fixed buffer; a descriptor CRIU passes (orphan-pts-master) is
//!   received with SCM_RIGHTS.
//! - CRIU's stderr goes to an anonymous memory file, so its complaints are
//!   available for the error even when no log file was asked for.

use std::fs::File;
use std::io::{IoSliceMut, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::socket::{
    recv, recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, SockFlag, SockType,
};
use nix::unistd::Pid;
use protobuf::Message;

use crate::error::{Error, Result};
use crate::reaper::{ChildExit, ExitWatch, Reaper};
use crate::rpc::{CriuReq, CriuResp};

/// How long we give CRIU to exit on its own after the last reply.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// A running `criu swrk`.
pub(crate) struct Session {
    sock: Option<OwnedFd>,
    pid: i32,
    watch: Box<dyn ExitWatch>,
    exit: Option<ChildExit>,
    stderr: File,
}

impl Session {
    /// Starts `binary swrk <fd>`; `inherited` fds stay open in CRIU at the same numbers.
    pub(crate) fn spawn(binary: &Path, reaper: &dyn Reaper, inherited: &[RawFd]) -> Result<Self> {
        let binary = resolve_binary(binary)?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| Error::io("create socketpair for CRIU", e.into()))?;
        let stderr = memfd("criu-stderr")?;

        let child_fd = theirs.as_raw_fd();
        let mut keep: Vec<RawFd> = inherited.to_vec();
        keep.push(child_fd);

        let mut cmd = Command::new(&binary);
        cmd.arg("swrk")
            .arg(child_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                stderr
                    .try_clone()
                    .map_err(|e| Error::io("dup CRIU stderr", e))?,
            );
        // SAFETY: only async-signal-safe calls (sigprocmask, signal, fcntl)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                SigSet::empty()
                    .thread_set_mask()
                    .map_err(std::io::Error::from)?;
                for sig in [libc::SIGCHLD, libc::SIGPIPE] {
                    libc::signal(sig, libc::SIG_DFL);
                }
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }

        // Arm the watch before the child exists: a reaper thread may collect
        // its exit the moment it happens.
        let watch = reaper.watch();
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            path: binary.clone(),
            source,
        })?;
        let pid = child.id() as i32;
        // The Child is dropped without waiting: its status belongs to the reaper.
        drop(child);
        drop(theirs);
        log::debug!("started {} swrk as pid {pid}", binary.display());
        Ok(Session {
            sock: Some(ours),
            pid,
            watch,
            exit: None,
            stderr,
        })
    }

    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    pub(crate) fn send(&self, req: &CriuReq) -> Result<()> {
        send_message(self.sock()?, req, None)
    }

    /// Receives one message. `Ok(None)` when `deadline` passed first.
    pub(crate) fn recv(&self, deadline: Option<Instant>) -> Result<Option<Received>> {
        let sock = self.sock()?;
        if !self.wait_readable(deadline)? {
            return Ok(None);
        }
        Ok(Some(match recv_message::<CriuResp>(sock)? {
            Some((resp, fds)) => Received::Message(Box::new(resp), fds.into_iter().next()),
            None => Received::Eof,
        }))
    }

    fn wait_readable(&self, deadline: Option<Instant>) -> Result<bool> {
        let sock = self.sock.as_ref().expect("socket open");
        loop {
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    // Round up so we never spin on a sub-millisecond remainder.
                    let ms = left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue, // re-evaluates the deadline
                Ok(_) => return Ok(true),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::io("wait for CRIU", e.into())),
            }
        }
    }

    fn sock(&self) -> Result<RawFd> {
        self.sock
            .as_ref()
            .map(|s| s.as_raw_fd())
            .ok_or_else(|| Error::Protocol("session already closed".into()))
    }

    /// Stops CRIU at once (deadline passed or the caller gave up).
    pub(crate) fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }

    /// Closes our end and collects CRIU's exit status, killing it if it
    /// lingers past the grace period.
    pub(crate) fn finish(&mut self) -> Option<ChildExit> {
        self.sock = None;
        if self.exit.is_none() {
            self.exit = self.wait_exit(EXIT_GRACE);
        }
        if self.exit.is_none() {
            log::warn!(
                "CRIU pid {} did not exit after its reply; killing it",
                self.pid
            );
            self.kill();
            self.exit = self.wait_exit(EXIT_GRACE);
        }
        self.exit
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ChildExit> {
        match self.watch.wait(self.pid, timeout) {
            Ok(exit) => exit,
            Err(e) => {
                log::warn!("cannot get exit status of CRIU pid {}: {e}", self.pid);
                None
            }
        }
    }

    /// What CRIU wrote to stderr (at most 64 KiB).
    pub(crate) fn stderr(&mut self) -> String {
        let mut out = String::new();
        if self.stderr.seek(SeekFrom::Start(0)).is_ok() {
            let _ = (&mut self.stderr).take(64 * 1024).read_to_string(&mut out);
        }
        out
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.kill();
            self.finish();
        }
    }
}

/// Sends one protobuf message as one SEQPACKET datagram, with an optional
/// descriptor (SCM_RIGHTS).
pub(crate) fn send_message<M: Message>(sock: RawFd, msg: &M, fd: Option<RawFd>) -> Result<()> {
    let bytes = msg
        .write_to_bytes()
        .map_err(|e| Error::Protocol(format!("encode message: {e}")))?;
    let iov = [std::io::IoSlice::new(&bytes)];
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    loop {
        match sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::io("send message", e.into())),
        }
    }
}

/// Receives one protobuf message and any descriptors sent with it;
/// `Ok(None)` when the peer closed the connection.
pub(crate) fn recv_message<M: Message>(sock: RawFd) -> Result<Option<(M, Vec<OwnedFd>)>> {
    let len = loop {
        match recv(sock, &mut [], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::io("peek at message", e.into())),
        }
    };
    if len == 0 {
        // A zero-length read on SEQPACKET is the peer closing.
        return Ok(None);
    }
    let mut buf = vec![0u8; len];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg
                    .cmsgs()
                    .map_err(|e| Error::io("read control message", e.into()))?
                {
                    if let ControlMessageOwned::ScmRights(rights) = c {
                        // SAFETY: the kernel just installed these fds for us.
                        fds.extend(
                            rights
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break (msg.bytes, fds);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::io("receive message", e.into())),
        }
    };
    if n == 0 {
        return Ok(None);
    }
    let msg = M::parse_from_bytes(&buf[..n])
        .map_err(|e| Error::Protocol(format!("decode message ({n} bytes): {e}")))?;
    Ok(Some((msg, fds)))
}

pub(crate) enum Received {
    Message(Box<CriuResp>, Option<OwnedFd>),
    Eof,
}

/// Finds the binary the way execvp would, so a missing CRIU is reported
/// with the path that was tried rather than a bare ENOENT.
fn resolve_binary(binary: &Path) -> Result<PathBuf> {
    if binary.components().count() > 1 || binary.is_absolute() {
        return if binary.is_file() {
            Ok(binary.to_path_buf())
        } else {
            Err(Error::BinaryNotFound {
                path: binary.to_path_buf(),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::BinaryNotFound {
            path: binary.to_path_buf(),
        })
}

fn memfd(name: &str) -> Result<File> {
    let cname = std::ffi::CString::new(name).expect("no NUL in name");
    // SAFETY: plain syscall; the returned fd is owned by the File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_path() {
        let err = resolve_binary(Path::new("/nonexistent/criu")).unwrap_err();
        assert!(matches!(err, Error::BinaryNotFound { .. }));
        assert!(err.to_string().contains("/nonexistent/criu"), "{err}");
        let err = resolve_binary(Path::new("no-such-criu-binary-xyz")).unwrap_err();
        assert!(err.to_string().contains("no-such-criu-binary-xyz"), "{err}");
    }

    #[test]
    fn finds_binaries_on_path() {
        assert!(resolve_binary(Path::new("sh")).unwrap().is_absolute());
    }
}
