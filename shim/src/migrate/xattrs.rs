//! Extended attributes that travel with a container's rootfs changes.
//!
//! File capabilities (`security.capability`, what `setcap` sets, e.g. on
//! ping) and `user.*` attributes belong to the files the container wrote;
//! without them a binary loses its capabilities on the new node. Overlay's
//! own bookkeeping (`trusted.overlay.*`, `user.overlay.*`) and the old
//! node's security labels stay behind. They travel as PAX records
//! (`SCHILY.xattr.NAME`, as GNU tar writes them).

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// PAX record key prefix for an extended attribute.
pub const PAX_PREFIX: &str = "SCHILY.xattr.";

/// At most this many attributes, each at most this large, per file.
const MAX_COUNT: usize = 64;
const MAX_VALUE: usize = 64 << 10;

/// Whether attribute `name` is carried over.
pub fn carried(name: &str) -> bool {
    name == "security.capability"
        || (name.starts_with("user.") && !name.starts_with("user.overlay."))
}

/// The carried attributes of `path` (not following a symlink).
pub fn read(path: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return Vec::new();
    };
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: writes at most names.len() bytes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for raw in names.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let Ok(name) = std::str::from_utf8(raw) else {
            continue;
        };
        if !carried(name) || out.len() >= MAX_COUNT {
            continue;
        }
        let cname = CString::new(raw).expect("no NUL inside a listed name");
        let mut value = vec![0u8; MAX_VALUE];
        // SAFETY: writes at most value.len() bytes.
        let k = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if k >= 0 {
            value.truncate(k as usize);
            out.push((name.to_string(), value));
        }
    }
    out
}

/// The carried attributes among an archive entry's PAX records, checked.
pub fn from_pax<'a>(
    records: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for (key, value) in records {
        let Some(name) = key.strip_prefix(PAX_PREFIX.as_bytes()) else {
            continue;
        };
        let name = std::str::from_utf8(name).map_err(|_| "attribute name is not UTF-8")?;
        if !carried(name) {
            return Err(format!("extended attribute {name} is not allowed"));
        }
        if value.len() > MAX_VALUE || out.len() >= MAX_COUNT || name.contains('\0') {
            return Err(format!(
                "extended attribute {name} is too large or too many"
            ));
        }
        out.push((name.to_string(), value.to_vec()));
    }
    Ok(out)
}

/// Sets `attrs` on the open file `fd`. Call after chown: chown drops file
/// capabilities.
pub fn apply(fd: BorrowedFd<'_>, attrs: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    for (name, value) in attrs {
        let cname = CString::new(name.as_bytes())?;
        // SAFETY: reads value.len() bytes from value.
        let r = unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_capabilities_and_user_attributes_travel() {
        assert!(carried("security.capability"));
        assert!(carried("user.note"));
        assert!(!carried("user.overlay.opaque"));
        assert!(!carried("trusted.overlay.origin"));
        assert!(!carried("security.selinux"));
        let hostile = [(
            b"SCHILY.xattr.trusted.overlay.redirect".as_slice(),
            b"/etc".as_slice(),
        )];
        assert!(from_pax(hostile.into_iter()).is_err());
        let fine = [
            (b"SCHILY.xattr.user.a".as_slice(), b"1".as_slice()),
            (b"path".as_slice(), b"ignored".as_slice()),
        ];
        assert_eq!(
            from_pax(fine.into_iter()).unwrap(),
            vec![("user.a".to_string(), b"1".to_vec())]
        );
    }
}
