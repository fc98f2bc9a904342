//! Opening paths beneath a root without ever following a symlink.
//!
//! The shim runs as root; paths it is handed (annotations, names on the
//! share, names inside archives) are hostile until proven otherwise. The
//! kernel's openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS resolves a
//! path relative to a directory fd, refuses `..` that climbs out and any
//! symlink on the way (including the last component), atomically, so no
//! rename race can redirect it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct open_how` (linux/openat2.h).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

/// Opens `rel` beneath the directory `root` with `flags` (O_CLOEXEC is
/// added); `mode` for O_CREAT. Errors: ELOOP for a symlink on the way,
/// EXDEV for a path that leaves `root`, ENOENT, ...
pub fn open(root: &impl AsRawFd, rel: &Path, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: if flags & libc::O_CREAT != 0 {
            u64::from(mode)
        } else {
            0
        },
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    loop {
        // SAFETY: openat2 reads `how` (of the size given) and the path string.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a new descriptor the kernel just gave us.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) && e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Opens the directory `path` itself, refusing a symlink at its last
/// component (the parents are the operator's configuration).
pub fn open_root(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    Ok(f.into())
}

/// Whether `e` means "a symlink (or an escape) was on the way".
pub fn is_escape(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EXDEV))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_and_escapes_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        std::fs::write(root.path().join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
        std::os::unix::fs::symlink("f", root.path().join("d/link")).unwrap();
        let fd = open_root(root.path()).unwrap();
        assert!(open(&fd, Path::new("d/f"), libc::O_RDONLY, 0).is_ok());
        for bad in [
            "out",
            "out/x",
            "d/link",
            "../etc/passwd",
            "/etc/passwd",
            "d/../../x",
        ] {
            let e = open(&fd, Path::new(bad), libc::O_RDONLY, 0).unwrap_err();
            assert!(
                is_escape(&e) || e.kind() == std::io::ErrorKind::NotFound,
                "{bad}: {e}"
            );
        }
        assert!(is_escape(
            &open(&fd, Path::new("out/x"), libc::O_RDONLY, 0).unwrap_err()
        ));
        std::os::unix::fs::symlink(root.path(), outside.path().join("to-root")).unwrap();
        assert!(open_root(&outside.path().join("to-root")).is_err());
    }
}
