//! The few userfaultfd operations a lazy-pages daemon needs, typed.
//!
//! CRIU's restore opens each task's userfaultfd (non-blocking, with the
//! fork, remap, remove and unmap events) and registers the task's lazy
//! mappings on it; the daemon only reads its messages and fills pages
//! (linux/userfaultfd.h: `struct uffd_msg`, `UFFDIO_COPY`,
//! `UFFDIO_ZEROPAGE`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;
const MSG_SIZE: usize = 32;

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

nix::ioctl_readwrite!(uffdio_copy, 0xAA, 0x03, UffdioCopy);
nix::ioctl_readwrite!(uffdio_zeropage, 0xAA, 0x04, UffdioZeropage);

/// What a task's userfaultfd tells.
#[derive(Debug)]
pub enum Event {
    /// A thread touched a missing page and waits for it.
    PageFault { address: u64 },
    /// The task forked; the child's lazy mappings are on this new uffd.
    Fork { child: OwnedFd },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(DONTNEED)` or `munmap`: these pages are not ours to fill.
    Remove { start: u64, end: u64 },
}

/// How a fill ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// Every page is in place (some may have been there already).
    Done,
    /// The task's mappings are changing (an event is pending): `done`
    /// bytes are in place, try the rest after reading events.
    Retry { done: u64 },
    /// The task has exited.
    Gone,
}

/// The next message on `uffd`, if one is waiting. `Ok(None)` also when the
/// task's memory is gone (read returns 0).
pub fn read_event(uffd: &OwnedFd) -> Result<Option<Event>, Errno> {
    let mut msg = [0u8; MSG_SIZE];
    let n = match nix::unistd::read(uffd, &mut msg) {
        Ok(n) => n,
        Err(Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e),
    };
    if n == 0 {
        return Err(Errno::ESRCH);
    }
    if n != MSG_SIZE {
        return Err(Errno::EIO);
    }
    let word = |at: usize| u64::from_ne_bytes(msg[at..at + 8].try_into().unwrap_or([0; 8]));
    Ok(Some(match msg[0] {
        UFFD_EVENT_PAGEFAULT => Event::PageFault { address: word(16) },
        UFFD_EVENT_FORK => {
            let fd = u32::from_ne_bytes(msg[8..12].try_into().unwrap_or([0; 4])) as i32;
            // SAFETY: the kernel installed this descriptor in our table for
            // the child and hands it to whoever reads the message.
            Event::Fork {
                child: unsafe { OwnedFd::from_raw_fd(fd) },
            }
        }
        UFFD_EVENT_REMAP => Event::Remap {
            from: word(8),
            to: word(16),
            len: word(24),
        },
        UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => Event::Remove {
            start: word(8),
            end: word(16),
        },
        _ => return Err(Errno::EPROTO),
    }))
}

/// Copies `bytes` to `dst` in the task and wakes threads waiting there.
/// Pages already present are skipped.
pub fn copy(uffd: &OwnedFd, dst: u64, bytes: &[u8]) -> Result<Filled, Errno> {
    let page = criu_sys::memory::PAGE_SIZE;
    let mut done: u64 = 0;
    let len = bytes.len() as u64;
    while done < len {
        let mut c = UffdioCopy {
            dst: dst + done,
            src: bytes[done as usize..].as_ptr() as u64,
            len: len - done,
            mode: 0,
            copy: 0,
        };
        // SAFETY: `c` is a valid uffdio_copy whose source range lies in `bytes`.
        let r = unsafe { uffdio_copy(uffd.as_raw_fd(), &mut c) };
        if r.is_ok() {
            return Ok(Filled::Done);
        }
        if c.copy > 0 {
            done += c.copy as u64;
            continue;
        }
        match Errno::from_raw((-c.copy) as i32) {
            // A page that is there already: leave it, go on after it.
            Errno::EEXIST => done += page,
            Errno::EAGAIN => return Ok(Filled::Retry { done }),
            Errno::ESRCH | Errno::ENOSPC => return Ok(Filled::Gone),
            e => return Err(e),
        }
    }
    Ok(Filled::Done)
}

/// Maps the zero page at `dst` (a page no image holds).
pub fn zero(uffd: &OwnedFd, dst: u64) -> Result<Filled, Errno> {
    let mut z = UffdioZeropage {
        start: dst,
        len: criu_sys::memory::PAGE_SIZE,
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: `z` is a valid uffdio_zeropage.
    match unsafe { uffdio_zeropage(uffd.as_raw_fd(), &mut z) } {
        Ok(_) => Ok(Filled::Done),
        Err(_) => match Errno::from_raw((-z.zeropage) as i32) {
            Errno::EEXIST => Ok(Filled::Done),
            Errno::EAGAIN => Ok(Filled::Retry { done: 0 }),
            Errno::ESRCH | Errno::ENOSPC => Ok(Filled::Gone),
            e => Err(e),
        },
    }
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);

/// The events CRIU asks for: fork, remap, remove, unmap.
pub const NONCOOPERATIVE: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);

/// A new userfaultfd (non-blocking) that has agreed on the API with the
/// kernel and these `features`.
pub fn open(features: u64) -> Result<OwnedFd, String> {
    // SAFETY: a plain syscall; the descriptor is owned right away.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(format!(
            "userfaultfd is not available ({}); lazy restore needs a kernel with \
             CONFIG_USERFAULTFD",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the syscall returned a new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: 0xAA,
        features,
        ioctls: 0,
    };
    // SAFETY: `api` is a valid uffdio_api.
    unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }
        .map_err(|e| format!("userfaultfd lacks the features {features:#x} ({e})"))?;
    Ok(fd)
}

/// Whether this kernel lets us serve a lazy restore: userfaultfd with the
/// events CRIU asks for (a process that forks or remaps must not hang).
pub fn available() -> Result<(), String> {
    open(NONCOOPERATIVE).map(drop).map_err(|e| {
        format!("{e}; lazy restore needs userfaultfd with its fork, remap, remove and unmap events")
    })
}

/// Registers `[start, start + len)` of this process on `uffd` for missing
/// pages, as CRIU's restorer registers a task's lazy mappings (tests).
#[cfg(test)]
pub fn register(uffd: &OwnedFd, start: u64, len: u64) -> Result<(), Errno> {
    #[repr(C)]
    struct UffdioRegister {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }
    nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
    let mut r = UffdioRegister {
        start,
        len,
        mode: 1, // UFFDIO_REGISTER_MODE_MISSING
        ioctls: 0,
    };
    // SAFETY: a valid uffdio_register for a range of this process.
    unsafe { uffdio_register(uffd.as_raw_fd(), &mut r) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_can_serve_lazy_restores() {
        available().unwrap();
    }
}
