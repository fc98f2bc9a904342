//! Network fix-ups around CRIU.
//!
//! A network namespace re-created by CRIU came back with its loopback
//! device down on these hosts, so a restored server could not be reached
//! on 127.0.0.1 (and anything talking to itself broke). Setting `lo` up is
//! idempotent and harmless where it already is.
//!
//! A dump that fails can leave CRIU's network lock behind, and the
//! container that runs on cannot be reached: always when CRIU is killed,
//! and (CRIU 4.2.1, nftables lock) when a lazy dump is called off. The
//! shim undoes it before the container runs again.

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
/// Both of CRIU's methods are undone, whichever was used: the iptables
/// lock is a chain `CRIU` jumped to from INPUT and OUTPUT (undoing it
/// where it does not exist fails harmlessly); the nftables lock is a
/// table `inet CRIU-<run id>`, named by a run id only CRIU knew, so every
/// `CRIU-` table in the namespace goes (nothing else names them so).
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
                if let Some((true, _)) = run(reaper, tool, &["-w", "--noflush"], UNLOCK) {
                    log::warn!("removed a network lock CRIU left in pid {pid}'s namespace ({tool})");
                }
            }
            let Some((true, tables)) = run(reaper, "nft", &["list", "tables"], "") else {
                return;
            };
            for table in criu_tables(&tables) {
                if let Some((true, _)) = run(reaper, "nft", &["delete", "table", "inet", table], "") {
                    log::warn!("removed a network lock CRIU left in pid {pid}'s namespace (nftables table {table})");
                }
            }
        });
    });
}

/// The tables CRIU's nftables lock makes, from `nft list tables`.
fn criu_tables(listing: &str) -> Vec<&str> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .filter(|name| name.starts_with("CRIU-"))
        .collect()
}

/// Runs `tool` (a host binary, in the calling thread's network
/// namespace) with `input` on its stdin: whether it succeeded, and its
/// output (the first MiB). None if it cannot run, or is still running
/// after 10 s (it is killed then: a failed checkpoint must not hang on
/// it). The exit comes from the shim's reaper, which reaps every child.
fn run(
    reaper: &dyn criu_sys::Reaper,
    tool: &str,
    args: &[&str],
    input: &str,
) -> Option<(bool, String)> {
    use std::io::{Read, Write};
    let mut watch = reaper.watch();
    let mut child = std::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    // Read beside the wait, so a tool that never ends cannot hold us.
    let reader = child.stdout.take().map(|stdout| {
        std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.take(1 << 20).read_to_string(&mut out);
            out
        })
    });
    let id = child.id() as i32;
    drop(child);
    match watch.wait(id, std::time::Duration::from_secs(10)) {
        Ok(Some(exit)) => {
            let out = reader.and_then(|r| r.join().ok()).unwrap_or_default();
            Some((exit.success(), out))
        }
        _ => {
            log::warn!("{tool} did not finish within 10 s; killed");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(id),
                nix::sys::signal::Signal::SIGKILL,
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_criu_s_lock_tables_are_taken() {
        let listing = "table inet filter\ntable inet CRIU-3f2a9c\ntable ip nat\ntable ip CRIU-x\n";
        assert_eq!(criu_tables(listing), ["CRIU-3f2a9c"]);
        assert!(criu_tables("").is_empty());
    }
}
