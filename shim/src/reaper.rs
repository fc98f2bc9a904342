//! Child exit statuses under containerd-shim's global reaper.
//!
//! The containerd-shim crate reaps every child with `waitpid(-1)` and
//! publishes the exits on its monitor. Anything the shim spawns (runc, CRIU)
//! must therefore be watched through a monitor subscription taken *before*
//! the spawn; [`MonitorReaper`] is that, shaped as criu-sys's [`Reaper`] so
//! the runc driver and criu-sys share it.

use std::io;
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, ExitEvent, Subject, Subscription, Topic};
use criu_sys::{ChildExit, ExitWatch, Reaper};

#[derive(Debug, Default, Clone, Copy)]
pub struct MonitorReaper;

impl Reaper for MonitorReaper {
    fn watch(&self) -> Box<dyn ExitWatch> {
        match monitor_subscribe(Topic::Pid) {
            Ok(sub) => Box::new(MonitorWatch { sub }),
            // Subscribing only fails on a poisoned lock; fall back to our own waitpid.
            Err(e) => {
                log::error!("cannot subscribe to the exit monitor: {e}");
                Box::new(criu_sys::WaitPid)
            }
        }
    }
}

struct MonitorWatch {
    sub: Subscription,
}

impl ExitWatch for MonitorWatch {
    fn wait(&mut self, pid: i32, timeout: Duration) -> io::Result<Option<ChildExit>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.sub.rx.recv_timeout(left) {
                Ok(ExitEvent {
                    subject: Subject::Pid(p),
                    exit_code,
                }) if p == pid => return Ok(Some(ChildExit::from_shell_status(exit_code))),
                Ok(_) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Ok(None),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::other("exit monitor closed"))
                }
            }
        }
    }
}
