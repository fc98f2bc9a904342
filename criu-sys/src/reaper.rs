//! How the exit status of the `criu swrk` child is obtained.
//!
//! A plain program can `waitpid(pid)` its own child. A containerd shim cannot:
//! the containerd-shim crate runs a SIGCHLD handler that calls `waitpid(-1)`
//! and hands every exit to subscribers of its exit monitor, so a direct
//! `waitpid` either races it or returns ECHILD. The caller therefore plugs in a
//! [`Reaper`]: it is asked to start watching *before* the child is spawned (so
//! an exit that happens immediately is not missed) and then to wait for the pid.

use std::io;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ChildExit {
    /// Decodes the shell-style status that containerd-shim's monitor reports
    /// (128 + signal for a killed process).
    pub fn from_shell_status(status: i32) -> Self {
        if status > 128 && status < 128 + 65 {
            ChildExit::Signal(status - 128)
        } else {
            ChildExit::Code(status)
        }
    }

    pub fn success(&self) -> bool {
        *self == ChildExit::Code(0)
    }
}

impl std::fmt::Display for ChildExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildExit::Code(c) => write!(f, "exit code {c}"),
            ChildExit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Supplies exit statuses of children that criu-sys spawns.
pub trait Reaper: Send + Sync {
    /// Called just before a child is spawned. The returned watch must see the
    /// child's exit even if it happens before [`ExitWatch::wait`] is called.
    fn watch(&self) -> Box<dyn ExitWatch>;
}

/// One armed watch, used for exactly one child.
pub trait ExitWatch: Send {
    /// Waits up to `timeout` for `pid` to exit. `Ok(None)` means it is still
    /// running when the time is up.
    fn wait(&mut self, pid: i32, timeout: Duration) -> io::Result<Option<ChildExit>>;
}

/// The default: `waitpid(pid)` on our own child. Right for programs that do
/// not reap children globally.
#[derive(Debug, Default, Clone, Copy)]
pub struct WaitPid;

impl Reaper for WaitPid {
    fn watch(&self) -> Box<dyn ExitWatch> {
        Box::new(WaitPid)
    }
}

impl ExitWatch for WaitPid {
    fn wait(&mut self, pid: i32, timeout: Duration) -> io::Result<Option<ChildExit>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(Some(ChildExit::Code(code))),
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return Ok(Some(ChildExit::Signal(sig as i32)))
                }
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_status_decodes_signals() {
        assert_eq!(ChildExit::from_shell_status(0), ChildExit::Code(0));
        assert_eq!(ChildExit::from_shell_status(1), ChildExit::Code(1));
        assert_eq!(ChildExit::from_shell_status(137), ChildExit::Signal(9));
    }

    #[test]
    fn waitpid_reports_exit_code() {
        // Reaped through WaitPid, which is what is under test.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let got = WaitPid
            .watch()
            .wait(child.id() as i32, Duration::from_secs(10))
            .unwrap();
        assert_eq!(got, Some(ChildExit::Code(7)));
    }
}
