//! A process's stdio: pipes owned by the shim, copied to and from
//! containerd's FIFOs; or a pseudo-terminal received from runc.
//!
//! Why pipes and not the FIFOs themselves (as containerd's Go shim does too):
//! a container holding a FIFO or a host /dev/null cannot be checkpointed and
//! restored elsewhere, while a pipe can be re-created at restore and handed
//! to CRIU as an inherited fd. Every process always gets pipes, even when
//! containerd gives no FIFO for a stream (that stream is then drained here).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::runc::ChildStdio;

/// The FIFO paths containerd gave for one process (empty = none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The shim's half of a process's stdio, alive while the process is.
pub struct ProcessIo {
    /// Write end of the stdin pipe (or the pty master): closed by CloseIO.
    stdin: Arc<Mutex<Option<File>>>,
    /// The pty master, for resizes.
    console: Option<Arc<File>>,
    copiers: Vec<JoinHandle<()>>,
    stdin_path: String,
}

impl ProcessIo {
    /// Pipes for a non-terminal process: returns the container's ends (for
    /// runc) and starts copying the shim's ends.
    pub fn pipes(paths: &StdioPaths) -> Result<(ChildStdio, ProcessIo)> {
        check_targets(paths)?;
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let stdin = Arc::new(Mutex::new(Some(File::from(in_w))));
        let mut copiers = Vec::new();
        if paths.stdin.is_empty() {
            // No stdin: the process reads EOF, as it would from /dev/null.
            stdin.lock().unwrap().take();
        } else {
            copiers.push(copy_stdin(&paths.stdin, stdin.clone()));
        }
        copiers.push(copy_out(File::from(out_r), &paths.stdout));
        copiers.push(copy_out(File::from(err_r), &paths.stderr));
        let child = ChildStdio {
            stdin: Some(in_r),
            stdout: Some(out_w),
            stderr: Some(err_w),
        };
        Ok((
            child,
            ProcessIo {
                stdin,
                console: None,
                copiers,
                stdin_path: paths.stdin.clone(),
            },
        ))
    }

    /// Copies between a pty master (from runc's console socket) and the FIFOs.
    pub fn terminal(master: OwnedFd, paths: &StdioPaths) -> Result<ProcessIo> {
        let master = File::from(master);
        let reader = master
            .try_clone()
            .map_err(|e| Error::io("dup pty master", e))?;
        let writer = master
            .try_clone()
            .map_err(|e| Error::io("dup pty master", e))?;
        let stdin = Arc::new(Mutex::new(Some(writer)));
        let mut copiers = vec![copy_out(reader, &paths.stdout)];
        if !paths.stdin.is_empty() {
            copiers.push(copy_stdin(&paths.stdin, stdin.clone()));
        }
        Ok(ProcessIo {
            stdin,
            console: Some(Arc::new(master)),
            copiers,
            stdin_path: paths.stdin.clone(),
        })
    }

    /// CloseIO: the process sees EOF on stdin.
    pub fn close_stdin(&self) {
        if self.console.is_none() {
            self.stdin.lock().unwrap().take();
        }
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let master = self
            .console
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("process has no terminal".into()))?;
        let ws = libc::winsize {
            ws_row: height as u16,
            ws_col: width as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(Error::io("resize pty", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// After the process exited: lets the output copiers drain what is left
    /// (bounded: a daemonised child may hold the pipe open forever), then
    /// releases the stdin copier.
    pub fn finish(&mut self, limit: Duration) {
        self.stdin.lock().unwrap().take();
        unblock_fifo_open(&self.stdin_path);
        let deadline = Instant::now() + limit;
        for h in std::mem::take(&mut self.copiers) {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("create stdio pipe", e.into()))
}

/// Copies from the stdin FIFO into the process's stdin until either closes.
fn copy_stdin(path: &str, target: Arc<Mutex<Option<File>>>) -> JoinHandle<()> {
    let path = path.to_string();
    std::thread::spawn(move || {
        // Blocks until containerd opens the writing end.
        let mut fifo = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("open stdin {path}: {e}");
                return;
            }
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match fifo.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut guard = target.lock().unwrap();
            match guard.as_mut() {
                Some(w) => {
                    if w.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                None => return,
            }
        }
        // EOF from containerd: pass it on (for a pty the master stays open).
        let mut guard = target.lock().unwrap();
        if let Some(w) = guard.as_ref() {
            if !is_tty(w) {
                guard.take();
            }
        }
    })
}

/// Where containerd wants a stream: a FIFO path, a `file://` log URI, or nothing.
fn open_output(target: &str) -> std::io::Result<Option<File>> {
    if target.is_empty() {
        return Ok(None);
    }
    if let Some(path) = target.strip_prefix("file://") {
        // `ctr run --log-uri file:///x.log`: both streams append to the file.
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir)?;
        }
        return OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map(Some);
    }
    // A FIFO, opened O_RDWR: opening never blocks on a missing reader, and
    // output is not lost with EPIPE while containerd (re)attaches.
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(target)
        .map(Some)
}

/// Log URIs whose scheme the shim cannot serve, refused at create with the fix.
pub fn check_targets(paths: &StdioPaths) -> Result<()> {
    for t in [&paths.stdout, &paths.stderr] {
        if let Some((scheme, _)) = t.split_once("://") {
            if scheme != "file" && scheme != "fifo" {
                return Err(Error::Unimplemented(format!(
                    "log URI scheme {scheme}:// is not supported by criu-shim; use file:// or no log URI"
                )));
            }
        }
    }
    Ok(())
}

/// Copies the process's output to where containerd wants it (or drains it).
fn copy_out(mut from: File, target: &str) -> JoinHandle<()> {
    let target = target.strip_prefix("fifo://").unwrap_or(target).to_string();
    std::thread::spawn(move || {
        let mut to = match open_output(&target) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("open output {target}: {e}");
                None
            }
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(f) = to.as_mut() {
                        if f.write_all(&buf[..n]).is_err() {
                            to = None;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // EIO: the pty's last holder closed it.
                Err(_) => break,
            }
        }
    })
}

fn is_tty(f: &File) -> bool {
    nix::unistd::isatty(f).unwrap_or(false)
}

/// A stdin copier may still be blocked opening a FIFO nobody ever wrote
/// to; opening the writing end ourselves releases it with EOF.
fn unblock_fifo_open(path: &str) {
    if path.is_empty() {
        return;
    }
    let _ = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
}

/// runc's `--console-socket`: runc connects and sends the pty master.
pub struct ConsoleSocket {
    dir: tempfile::TempDir,
    listener: UnixListener,
}

impl ConsoleSocket {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("criu-shim-pty")
            .tempdir()
            .map_err(|e| Error::io("create console socket dir", e))?;
        let listener = UnixListener::bind(dir.path().join("pty.sock"))
            .map_err(|e| Error::io("bind console socket", e))?;
        Ok(ConsoleSocket { dir, listener })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("pty.sock")
    }

    /// Receives the master after runc create/exec returned (runc has sent
    /// it by then; the connection waits in the backlog).
    pub fn receive_master(&self) -> Result<OwnedFd> {
        self.listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("console socket", e))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(Error::Other("runc never sent the terminal".into()));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(Error::io("accept console socket", e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(|e| Error::io("console socket", e))?;
        recv_fd(&stream)
    }
}

fn recv_fd(stream: &std::os::unix::net::UnixStream) -> Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| Error::io("receive pty master", e.into()))?;
    for c in msg
        .cmsgs()
        .map_err(|e| Error::io("receive pty master", e.into()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel installed this fd for us.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err(Error::Other("runc sent no terminal fd".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_the_fifo_and_stdin_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let inp = dir.path().join("in");
        for p in [&out, &inp] {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits(0o600).unwrap()).unwrap();
        }
        let paths = StdioPaths {
            stdin: inp.to_string_lossy().into(),
            stdout: out.to_string_lossy().into(),
            stderr: String::new(),
            terminal: false,
        };
        // containerd opens its end of the output FIFO before Create; so do we
        // (O_RDWR: opening does not wait for the writer).
        let mut fifo_out = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out)
            .unwrap();
        let (child, mut io) = ProcessIo::pipes(&paths).unwrap();
        // Play the container: echo stdin to stdout.
        let mut c_in = File::from(child.stdin.unwrap());
        let mut c_out = File::from(child.stdout.unwrap());
        let mut w = OpenOptions::new().write(true).open(&inp).unwrap();
        w.write_all(b"hello\n").unwrap();
        drop(w);
        let mut got = String::new();
        c_in.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello\n", "stdin EOF must reach the process");
        c_out.write_all(got.as_bytes()).unwrap();
        drop(c_out);
        drop(child.stderr);
        io.finish(Duration::from_secs(5));
        drop(io);
        let mut seen = [0u8; 6];
        fifo_out.read_exact(&mut seen).unwrap();
        assert_eq!(&seen, b"hello\n");
    }
}
