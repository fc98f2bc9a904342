//! Network fix-ups for restored containers.
//!
//! A network namespace re-created by CRIU came back with its loopback
//! device down on these hosts, so a restored server could not be reached
//! on 127.0.0.1 (and anything talking to itself broke). Setting `lo` up is
//! idempotent and harmless where it already is.

use std::os::fd::AsRawFd;

/// Sets `lo` up in the network namespace of `pid`.
pub fn loopback_up(pid: i32) -> std::io::Result<()> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    // setns changes only the calling thread's namespace: use a throwaway thread.
    std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        set_up("lo")
    })
    .join()
    .map_err(|_| std::io::Error::other("loopback thread panicked"))?
}

fn set_up(ifname: &str) -> std::io::Result<()> {
    // SAFETY: plain socket; closed by the OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Removes the network lock a killed CRIU left behind in the network
/// namespace of `pid` (CRIU drops every packet there while it dumps; when
/// CRIU dies half-way nobody unlocks, and the container is cut off).
/// CRIU's iptables lock is a chain `CRIU` jumped to from INPUT and OUTPUT;
/// undoing it where it does not exist fails harmlessly.
pub fn unlock_criu_network(pid: i32, reaper: &dyn criu_sys::Reaper) {
    const UNLOCK: &str =
        "*filter\n:CRIU - [0:0]\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n-X CRIU\nCOMMIT\n";
    let Ok(ns) = std::fs::File::open(format!("/proc/{pid}/ns/net")) else {
        return;
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            if nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return;
            }
            for tool in ["iptables-restore", "ip6tables-restore"] {
                let mut watch = reaper.watch();
                let child = std::process::Command::new(tool)
                    .args(["-w", "--noflush"])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn();
                let Ok(mut child) = child else { continue };
                if let Some(mut stdin) = child.stdin.take() {
                    let _ = std::io::Write::write_all(&mut stdin, UNLOCK.as_bytes());
                }
                let id = child.id() as i32;
                drop(child);
                if let Ok(Some(exit)) = watch.wait(id, std::time::Duration::from_secs(10)) {
                    if exit.success() {
                        log::warn!(
                            "removed a network lock CRIU left in pid {pid}'s namespace ({tool})"
                        );
                    }
                }
            }
        });
    });
}
