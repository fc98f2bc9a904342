//! One process of a container (its init, or an exec) and its lifecycle:
//! created -> running (<-> paused, init only) -> stopped.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::stdio::{ProcessIo, StdioPaths};

/// containerd's task status values (containerd.v1.types.Status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn to_proto(self) -> containerd_shim::protos::api::Status {
        use containerd_shim::protos::api::Status as S;
        match self {
            Status::Created => S::CREATED,
            Status::Running => S::RUNNING,
            Status::Paused => S::PAUSED,
            Status::Stopped => S::STOPPED,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

struct State {
    status: Status,
    pid: i32,
    exit: Option<Exit>,
    io: Option<ProcessIo>,
}

pub struct Process {
    /// Exec id; empty for the init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// The OCI process spec of an exec (JSON), written for `runc exec`.
    pub spec: Option<Vec<u8>>,
    state: Mutex<State>,
    exited: Condvar,
}

/// How long output copiers may drain after a process exits.
const IO_DRAIN: Duration = Duration::from_secs(2);

impl Process {
    pub fn new(exec_id: &str, stdio: StdioPaths, spec: Option<Vec<u8>>) -> Self {
        Process {
            exec_id: exec_id.to_string(),
            stdio,
            spec,
            state: Mutex::new(State {
                status: Status::Created,
                pid: 0,
                exit: None,
                io: None,
            }),
            exited: Condvar::new(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.state.lock().unwrap().pid
    }

    pub fn status(&self) -> Status {
        self.state.lock().unwrap().status
    }

    pub fn exit(&self) -> Option<Exit> {
        self.state.lock().unwrap().exit
    }

    pub fn set_io(&self, io: ProcessIo) {
        self.state.lock().unwrap().io = Some(io);
    }

    /// Created (init) or started (exec): the process has a pid.
    pub fn set_pid(&self, pid: i32) {
        self.state.lock().unwrap().pid = pid;
    }

    pub fn set_status(&self, status: Status) {
        let mut s = self.state.lock().unwrap();
        if s.status != Status::Stopped {
            s.status = status;
        }
    }

    /// Records the exit once; returns false if it was already recorded.
    /// Output is drained first so that a reader of the FIFOs has all of it
    /// by the time containerd learns about the exit.
    pub fn set_exited(&self, status: u32) -> bool {
        let io = {
            let mut s = self.state.lock().unwrap();
            if s.exit.is_some() {
                return false;
            }
            s.io.take()
        };
        if let Some(mut io) = io {
            io.finish(IO_DRAIN);
        }
        let mut s = self.state.lock().unwrap();
        if s.exit.is_some() {
            return false;
        }
        s.status = Status::Stopped;
        s.exit = Some(Exit {
            status,
            at: SystemTime::now(),
        });
        self.exited.notify_all();
        true
    }

    /// Blocks until the process has exited.
    pub fn wait(&self) -> Exit {
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(e) = s.exit {
                return e;
            }
            s = self.exited.wait(s).unwrap();
        }
    }

    pub fn close_stdin(&self) {
        if let Some(io) = self.state.lock().unwrap().io.as_ref() {
            io.close_stdin();
        }
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let s = self.state.lock().unwrap();
        match s.io.as_ref() {
            Some(io) => io.resize(width, height),
            // A terminal client may resize just after the exit: nothing to do.
            None if s.status == Status::Stopped => Ok(()),
            None => Err(Error::FailedPrecondition(format!(
                "process {} has no stdio",
                self.display_id()
            ))),
        }
    }

    pub fn display_id(&self) -> &str {
        if self.exec_id.is_empty() {
            "init"
        } else {
            &self.exec_id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn exit_is_recorded_once_and_wakes_waiters() {
        let p = Arc::new(Process::new("", StdioPaths::default(), None));
        p.set_pid(42);
        p.set_status(Status::Running);
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || p.wait().status)
        };
        assert!(p.set_exited(3));
        assert!(
            !p.set_exited(9),
            "a second exit must not overwrite the first"
        );
        assert_eq!(waiter.join().unwrap(), 3);
        assert_eq!(p.status(), Status::Stopped);
        p.set_status(Status::Running);
        assert_eq!(p.status(), Status::Stopped, "stopped is final");
    }
}
