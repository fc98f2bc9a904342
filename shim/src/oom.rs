//! TaskOOM: the kernel's OOM notifications for a container's memory cgroup.
//!
//! On cgroup v1 (these hybrid hosts) an eventfd registered through
//! `cgroup.event_control` fires on every OOM in `memory.oom_control`, and
//! once more when the cgroup is removed, which ends the watch. Unified
//! (v2-only) hosts are not watched yet.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

/// The v1 memory cgroup directory of `pid`.
fn memory_cgroup(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    })?;
    let dir = PathBuf::from("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// Calls `on_oom` for every OOM kill in `pid`'s memory cgroup, from a thread
/// that ends when the cgroup goes away.
pub fn watch(pid: i32, on_oom: impl Fn() + Send + 'static) {
    let Some(dir) = memory_cgroup(pid) else {
        log::debug!("no v1 memory cgroup for pid {pid}: OOM events not watched");
        return;
    };
    // SAFETY: plain syscall; the fd is owned by the File.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        log::warn!("eventfd: {}", std::io::Error::last_os_error());
        return;
    }
    // SAFETY: fresh fd we own.
    let mut event = unsafe { File::from_raw_fd(efd) };
    let registered = File::open(dir.join("memory.oom_control")).and_then(|oom| {
        let line = format!("{} {}", event.as_raw_fd(), oom.as_raw_fd());
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.event_control"))?
            .write_all(line.as_bytes())
    });
    if let Err(e) = registered {
        log::warn!("cannot watch OOM in {}: {e}", dir.display());
        return;
    }
    std::thread::spawn(move || {
        let mut buf = [0u8; 8];
        while event.read_exact(&mut buf).is_ok() {
            if !dir.exists() {
                break;
            }
            on_oom();
        }
    });
}
