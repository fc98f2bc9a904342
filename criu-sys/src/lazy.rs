//! The lazy-pages socket: how `criu restore --lazy-pages` hands each
//! restored task's userfaultfd to whoever serves its memory.
//!
//! CRIU's restore connects once to `lazy-pages.socket` in its work
//! directory (uffd.c: `prepare_lazy_pages_socket`), then, on that one
//! stream, for every task of the tree: the task's pid in the images as a
//! native `int`, followed for a live task by its userfaultfd (SCM_RIGHTS
//! with a one-byte payload; a zombie's pid is sent negated, with no fd).
//! Once every task is restored it sends the u32 `RESTORE_FINISHED` and
//! closes. Serving faults before that is allowed (the restorer itself may
//! fault); copying in the background should wait for it.
//!
//! The daemon side is all this module does: bind, accept, and read those
//! messages as [`LazyMessage`]s. Serving the faults is the caller's.

use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// The socket's name in CRIU's work directory.
pub const SOCKET_NAME: &str = "lazy-pages.socket";
/// "ReSTore Finished" (uffd.c `LAZY_PAGES_RESTORE_FINISHED`).
pub const RESTORE_FINISHED: u32 = 0x5253_5446;
/// CRIU sends a task's pid and its fd back to back; a silent peer is stuck.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// One message of a restore on the lazy-pages socket.
#[derive(Debug)]
pub enum LazyMessage {
    /// A live task and the userfaultfd its lazy mappings are registered on.
    Task { pid: u32, uffd: OwnedFd },
    /// A zombie: nothing to serve.
    Zombie { pid: u32 },
    /// Every task is restored.
    RestoreFinished,
}

/// The listening socket, in CRIU's work directory.
pub struct LazyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl LazyListener {
    /// Listens at `<work_dir>/lazy-pages.socket`, reachable by root only.
    /// The path is bound through `/proc/self/fd`, so a work directory
    /// deeper than a socket address can name (108 bytes) still works.
    pub fn bind(work_dir: &Path) -> io::Result<LazyListener> {
        let dir = std::fs::File::open(work_dir)?;
        let path = work_dir.join(SOCKET_NAME);
        let short = PathBuf::from(format!("/proc/self/fd/{}/{SOCKET_NAME}", dir.as_raw_fd()));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&short)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(LazyListener { listener, path })
    }

    /// The restore's connection, if it has connected.
    pub fn accept(&self) -> io::Result<Option<LazyConnection>> {
        match self.listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
                Ok(Some(LazyConnection { stream }))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for LazyListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for LazyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The restore's end of the conversation.
pub struct LazyConnection {
    stream: UnixStream,
}

impl LazyConnection {
    /// The next message; None once CRIU has closed the connection.
    pub fn recv(&mut self) -> io::Result<Option<LazyMessage>> {
        let mut word = [0u8; 4];
        match self.stream.read(&mut word[..1])? {
            0 => return Ok(None),
            _ => self.stream.read_exact(&mut word[1..])?,
        }
        if u32::from_ne_bytes(word) == RESTORE_FINISHED {
            return Ok(Some(LazyMessage::RestoreFinished));
        }
        let pid = i32::from_ne_bytes(word);
        if pid < 0 {
            return Ok(Some(LazyMessage::Zombie {
                pid: pid.unsigned_abs(),
            }));
        }
        let uffd = self.recv_fd()?;
        Ok(Some(LazyMessage::Task {
            pid: pid as u32,
            uffd,
        }))
    }

    fn recv_fd(&self) -> io::Result<OwnedFd> {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            self.stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut got = None;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel just installed this fd for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    got.get_or_insert(owned);
                }
            }
        }
        got.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a task's pid came without its userfaultfd",
            )
        })
    }
}

impl AsFd for LazyConnection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{IoSlice, Write};

    use nix::sys::socket::{sendmsg, ControlMessage};

    /// What CRIU's `send_uffd` and `lazy_pages_finish_restore` write.
    fn criu_side(work: &Path, fd: BorrowedFd) {
        let mut s = UnixStream::connect(work.join(SOCKET_NAME)).unwrap();
        s.write_all(&7i32.to_ne_bytes()).unwrap();
        let fds = [fd.as_raw_fd()];
        sendmsg::<()>(
            s.as_raw_fd(),
            &[IoSlice::new(&[0])],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        s.write_all(&(-9i32).to_ne_bytes()).unwrap();
        s.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
    }

    #[test]
    fn reads_what_criu_sends_and_binds_beneath_long_paths() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("w".repeat(120));
        std::fs::create_dir(&work).unwrap();
        let l = LazyListener::bind(&work).unwrap();
        let mode = std::fs::metadata(l.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(l.accept().unwrap().is_none(), "no one has connected yet");
        let (a, _b) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            // Connect through a short path, as CRIU's relative name does.
            let dir = std::fs::File::open(&work).unwrap();
            let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
            let criu = s.spawn(move || criu_side(&short, a.as_fd()));
            let mut c = loop {
                if let Some(c) = l.accept().unwrap() {
                    break c;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            match c.recv().unwrap() {
                Some(LazyMessage::Task { pid: 7, uffd }) => drop(uffd),
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                c.recv().unwrap(),
                Some(LazyMessage::Zombie { pid: 9 })
            ));
            assert!(matches!(
                c.recv().unwrap(),
                Some(LazyMessage::RestoreFinished)
            ));
            criu.join().unwrap();
            assert!(c.recv().unwrap().is_none());
        });
        let path = l.path().to_path_buf();
        drop(l);
        assert!(!path.exists(), "the socket goes with the listener");
    }
}
