//! Applying a checkpoint's writable-layer changes to the new container's
//! rootfs: first the deletions (`deleted.files`), then the added and changed
//! files (`rootfs-diff.tar`).
//!
//! The rootfs is the new container's and may hold symlinks pointing
//! anywhere on the host; the diff comes from another node. So no path is
//! ever resolved by the kernel from the rootfs's root: every component is
//! opened with O_NOFOLLOW|O_DIRECTORY relative to the previous one, which
//! makes escaping through `..` or a symlink impossible. Only directories,
//! regular files, FIFOs and symlinks (created, never followed) are accepted.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use super::members;
use crate::error::{Error, Result};

/// Applies `deleted.files` and `rootfs-diff.tar` from `staged` to `rootfs`.
pub fn apply(staged: &Path, rootfs: &Path) -> Result<()> {
    let root = open_dir(rootfs)?;
    if let Ok(list) = std::fs::read(staged.join(members::DELETED)) {
        let deleted: Vec<String> = serde_json::from_slice(&list)
            .map_err(|e| Error::InvalidArgument(format!("deleted.files unreadable: {e}")))?;
        for path in deleted {
            delete(&root, &path)?;
        }
    }
    if let Ok(f) = File::open(staged.join(members::ROOTFS_DIFF)) {
        extract_diff(&root, f)?;
    }
    Ok(())
}

fn open_dir(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(format!("open rootfs {}", path.display()), e.into()))
}

/// Splits a container path into its components, refusing anything but
/// plain names.
fn components(path: &str) -> Result<Vec<&OsStr>> {
    if path.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "rootfs change {path:?} refused: a NUL byte in the path"
        )));
    }
    let mut out = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "rootfs change {path:?} refused: path traversal"
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "rootfs change {path:?} refused: empty path"
        )));
    }
    Ok(out)
}

/// Opens the directory holding the last component, walking without ever
/// following a symlink; creates missing directories when `create`.
fn parent_of(
    root: &OwnedFd,
    comps: &[&OsStr],
    create: bool,
    path: &str,
) -> Result<Option<OwnedFd>> {
    let mut dir = root
        .try_clone()
        .map_err(|e| Error::io("dup rootfs fd", e))?;
    for c in &comps[..comps.len() - 1] {
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let next = match openat(dir.as_fd(), *c, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) if create => {
                nix::sys::stat::mkdirat(dir.as_fd(), *c, Mode::from_bits_truncate(0o755))
                    .map_err(|e| Error::io(format!("mkdir for {path}"), e.into()))?;
                openat(dir.as_fd(), *c, flags, Mode::empty())
                    .map_err(|e| Error::io(format!("open dir for {path}"), e.into()))?
            }
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return Err(Error::InvalidArgument(format!(
                    "rootfs change {path:?} refused: it crosses a symlink or a file"
                )))
            }
            Err(e) => return Err(Error::io(format!("open dir for {path}"), e.into())),
        };
        dir = next;
    }
    Ok(Some(dir))
}

/// A path component for libc; [`components`] has already refused NULs,
/// so the error is only a second line of defence.
fn cname(n: &OsStr) -> Result<CString> {
    CString::new(n.as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("rootfs change {n:?} refused: a NUL byte")))
}

/// Removes `path` (file, symlink or whole directory) inside the rootfs.
fn delete(root: &OwnedFd, path: &str) -> Result<()> {
    let comps = components(path)?;
    let Some(dir) = parent_of(root, &comps, false, path)? else {
        return Ok(());
    };
    remove_at(&dir, comps[comps.len() - 1])
}

fn remove_at(dir: &OwnedFd, name: &OsStr) -> Result<()> {
    let c = cname(name)?;
    // SAFETY: unlinkat on a name relative to a directory fd we own.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    match Errno::last() {
        Errno::ENOENT => Ok(()),
        Errno::EISDIR | Errno::EPERM => {
            let sub = openat(
                dir.as_fd(),
                name,
                OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io("open dir to delete", e.into()))?;
            let entries: Vec<std::ffi::OsString> =
                std::fs::read_dir(format!("/proc/self/fd/{}", sub.as_raw_fd()))
                    .map_err(|e| Error::io("list dir to delete", e))?
                    .filter_map(|e| e.ok().map(|e| e.file_name()))
                    .collect();
            for e in entries {
                remove_at(&sub, &e)?;
            }
            // SAFETY: as above, with AT_REMOVEDIR.
            if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
                return Err(Error::io("remove dir", std::io::Error::last_os_error()));
            }
            Ok(())
        }
        e => Err(Error::io("delete from rootfs", e.into())),
    }
}

/// Longest GNU long name or link, or PAX header, accepted. The tar crate
/// would read any size it is told into memory; we read these entries
/// ourselves (raw entries), bounded.
const MAX_EXTENSION: u64 = 1 << 20;

/// Extension entries seen before the entry they describe.
#[derive(Default)]
struct Pending {
    name: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

fn unreadable(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("rootfs-diff.tar unreadable: {e}"))
}

fn read_extension(entry: &mut impl Read, size: u64) -> Result<Vec<u8>> {
    if size > MAX_EXTENSION {
        return Err(Error::InvalidArgument(format!(
            "rootfs-diff.tar refused: an extension header of {size} bytes (at most {MAX_EXTENSION})"
        )));
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry.take(size).read_to_end(&mut buf).map_err(unreadable)?;
    Ok(buf)
}

/// PAX records (`LEN KEY=VALUE\n`...) as (key, value) pairs.
fn pax_records(data: &[u8]) -> Result<Vec<(&[u8], &[u8])>> {
    let bad = || unreadable("malformed PAX header");
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|b| *b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        out.push((&record[..eq], &record[eq + 1..]));
        rest = &rest[len..];
    }
    Ok(out)
}

fn extract_diff(root: &OwnedFd, input: impl Read) -> Result<()> {
    let mut ar = tar::Archive::new(input);
    let entries = ar.entries().map_err(unreadable)?.raw(true);
    let mut pending = Pending::default();
    for entry in entries {
        let mut entry = entry.map_err(unreadable)?;
        let size = entry.size();
        match entry.header().entry_type() {
            tar::EntryType::GNULongName => {
                pending.name = Some(trim_nul(read_extension(&mut entry, size)?));
                continue;
            }
            tar::EntryType::GNULongLink => {
                pending.link = Some(trim_nul(read_extension(&mut entry, size)?));
                continue;
            }
            tar::EntryType::XHeader => {
                pending.pax = Some(read_extension(&mut entry, size)?);
                continue;
            }
            tar::EntryType::XGlobalHeader => {
                read_extension(&mut entry, size)?;
                continue;
            }
            _ => {}
        }
        let pax = pending.pax.take().unwrap_or_default();
        let records = pax_records(&pax)?;
        let from_pax = |key: &[u8]| {
            records
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_vec())
        };
        if from_pax(b"size").is_some() {
            return Err(Error::InvalidArgument(
                "rootfs-diff.tar refused: PAX size records are not supported".into(),
            ));
        }
        let path_bytes = from_pax(b"path")
            .or(pending.name.take())
            .unwrap_or_else(|| entry.path_bytes().into_owned());
        let link = from_pax(b"linkpath")
            .or(pending.link.take())
            .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()));
        let path = String::from_utf8_lossy(&path_bytes).into_owned();
        let comps = components(&path)?;
        let name = comps[comps.len() - 1];
        let Some(dir) = parent_of(root, &comps, true, &path)? else {
            return Err(Error::Other(format!(
                "rootfs change {path:?}: parent not created"
            )));
        };
        let attrs = super::xattrs::from_pax(records.iter().copied()).map_err(|why| {
            Error::InvalidArgument(format!("rootfs change {path:?} refused: {why}"))
        })?;
        let set_attrs = |fd: std::os::fd::BorrowedFd<'_>| {
            super::xattrs::apply(fd, &attrs)
                .map_err(|e| Error::io(format!("set extended attributes of {path}"), e))
        };
        let h = entry.header().clone();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32);
        match h.entry_type() {
            tar::EntryType::Directory => {
                match nix::sys::stat::mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(mode)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(Error::io(format!("mkdir {path}"), e.into())),
                }
                chown_at(&dir, name, uid, gid, &path)?;
                if !attrs.is_empty() {
                    let d = openat(
                        dir.as_fd(),
                        name,
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| Error::io(format!("open {path}"), e.into()))?;
                    set_attrs(d.as_fd())?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                // Replace whatever is there (a symlink is replaced, never followed).
                let _ = nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
                let fd = openat(
                    dir.as_fd(),
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(mode),
                )
                .map_err(|e| Error::io(format!("create {path}"), e.into()))?;
                // SAFETY: fresh fd we own.
                let mut f = unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
                std::io::copy(&mut entry, &mut f)
                    .map_err(|e| Error::io(format!("write {path}"), e))?;
                nix::unistd::fchown(&f, Some(uid.into()), Some(gid.into()))
                    .map_err(|e| Error::io(format!("chown {path}"), e.into()))?;
                nix::sys::stat::fchmod(&f, Mode::from_bits_truncate(mode))
                    .map_err(|e| Error::io(format!("chmod {path}"), e.into()))?;
                // Last: chown drops file capabilities.
                set_attrs(f.as_fd())?;
            }
            tar::EntryType::Fifo => {
                let _ = nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
                nix::unistd::mkfifoat(dir.as_fd(), name, Mode::from_bits_truncate(mode))
                    .map_err(|e| Error::io(format!("mkfifo {path}"), e.into()))?;
                chown_at(&dir, name, uid, gid, &path)?;
                // mkfifo applied our umask; the container's mode is the one.
                nix::sys::stat::fchmodat(
                    dir.as_fd(),
                    name,
                    Mode::from_bits_truncate(mode),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| Error::io(format!("chmod {path}"), e.into()))?;
            }
            tar::EntryType::Symlink => {
                let target = link.ok_or_else(|| {
                    Error::InvalidArgument(format!("symlink {path} has no target"))
                })?;
                let _ = nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
                nix::unistd::symlinkat(OsStr::from_bytes(&target), &dir, name)
                    .map_err(|e| Error::io(format!("symlink {path}"), e.into()))?;
                chown_at(&dir, name, uid, gid, &path)?;
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "rootfs change {path:?} refused: {other:?} entries are not allowed"
                )))
            }
        }
    }
    Ok(())
}

/// A GNU long name's data ends with a NUL.
fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn chown_at(dir: &OwnedFd, name: &OsStr, uid: u32, gid: u32, path: &str) -> Result<()> {
    nix::unistd::fchownat(
        dir,
        name,
        Some(uid.into()),
        Some(gid.into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| Error::io(format!("chown {path}"), e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn diff_tar(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file_entry(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        // set_path refuses '..'; write the raw name like a hostile tool would.
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    #[test]
    fn applies_files_symlinks_and_deletions() {
        let rootfs = tempfile::tempdir().unwrap();
        let staged = tempfile::tempdir().unwrap();
        std::fs::write(rootfs.path().join("old"), b"x").unwrap();
        std::fs::create_dir_all(rootfs.path().join("olddir/sub")).unwrap();
        std::fs::write(rootfs.path().join("olddir/sub/f"), b"x").unwrap();
        std::fs::write(
            staged.path().join(members::DELETED),
            br#"["/old","/olddir","/never"]"#,
        )
        .unwrap();
        let tar = diff_tar(|b| {
            file_entry(b, "data/state", b"42");
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "data/link", "/etc/passwd").unwrap();
        });
        std::fs::write(staged.path().join(members::ROOTFS_DIFF), tar).unwrap();
        apply(staged.path(), rootfs.path()).unwrap();
        assert_eq!(
            std::fs::read(rootfs.path().join("data/state")).unwrap(),
            b"42"
        );
        assert_eq!(
            std::fs::read_link(rootfs.path().join("data/link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert!(!rootfs.path().join("old").exists());
        assert!(!rootfs.path().join("olddir").exists());
    }

    #[test]
    fn refuses_traversal_and_writing_through_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let staged = tempfile::tempdir().unwrap();
        // A symlink in the rootfs pointing out of it.
        std::os::unix::fs::symlink(outside.path(), rootfs.path().join("escape")).unwrap();
        for hostile in ["../evil", "escape/evil"] {
            let tar = diff_tar(|b| file_entry(b, hostile, b"pwned"));
            std::fs::write(staged.path().join(members::ROOTFS_DIFF), tar).unwrap();
            let err = apply(staged.path(), rootfs.path()).unwrap_err();
            assert!(err.to_string().contains("refused"), "{hostile}: {err}");
        }
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "wrote outside"
        );
        // Deleting through the symlink is refused too.
        std::fs::write(outside.path().join("keep"), b"1").unwrap();
        std::fs::remove_file(staged.path().join(members::ROOTFS_DIFF)).unwrap();
        std::fs::write(staged.path().join(members::DELETED), br#"["/escape/keep"]"#).unwrap();
        assert!(apply(staged.path(), rootfs.path()).is_err());
        assert!(outside.path().join("keep").exists());
    }

    #[test]
    fn refuses_devices() {
        let rootfs = tempfile::tempdir().unwrap();
        let staged = tempfile::tempdir().unwrap();
        let tar = diff_tar(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Char);
            h.set_size(0);
            h.set_path("dev/mem").unwrap();
            h.set_device_major(1).unwrap();
            h.set_device_minor(1).unwrap();
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        });
        std::fs::write(staged.path().join(members::ROOTFS_DIFF), tar).unwrap();
        let err = apply(staged.path(), rootfs.path()).unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{err}");
    }

    fn set(path: &Path, name: &str, value: &[u8]) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: valid C strings and buffer.
        let r = unsafe {
            libc::setxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(r, 0, "setxattr {name}: {}", std::io::Error::last_os_error());
    }

    fn get(path: &Path, name: &str) -> Option<Vec<u8>> {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        let mut v = vec![0u8; 256];
        // SAFETY: writes at most v.len() bytes.
        let k = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        (k >= 0).then(|| v[..k as usize].to_vec())
    }

    #[test]
    fn file_capabilities_user_attributes_and_fifos_carry_over() {
        let upper = tempfile::tempdir().unwrap();
        let staged = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let ping = upper.path().join("bin/ping");
        std::fs::create_dir_all(ping.parent().unwrap()).unwrap();
        std::fs::write(&ping, b"\x7fELF").unwrap();
        // setcap cap_net_raw+ep: VFS_CAP_REVISION_2 | effective, permitted bit 13.
        let cap: [u8; 20] = [
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        set(&ping, "security.capability", &cap);
        set(&ping, "user.origin", b"node-a");
        set(upper.path().join("bin").as_path(), "user.dir", b"yes");
        nix::unistd::mkfifo(
            &upper.path().join("bin/queue"),
            Mode::from_bits_truncate(0o620),
        )
        .unwrap();
        crate::migrate::stage::write_rootfs_diff(upper.path(), staged.path()).unwrap();
        apply(staged.path(), rootfs.path()).unwrap();
        let moved = rootfs.path().join("bin/ping");
        assert_eq!(std::fs::read(&moved).unwrap(), b"\x7fELF");
        assert_eq!(
            get(&moved, "security.capability").as_deref(),
            Some(&cap[..])
        );
        assert_eq!(get(&moved, "user.origin").as_deref(), Some(&b"node-a"[..]));
        assert_eq!(
            get(&rootfs.path().join("bin"), "user.dir").as_deref(),
            Some(&b"yes"[..])
        );
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let fifo = std::fs::symlink_metadata(rootfs.path().join("bin/queue")).unwrap();
        assert!(fifo.file_type().is_fifo());
        let source = std::fs::symlink_metadata(upper.path().join("bin/queue")).unwrap();
        assert_eq!(fifo.permissions().mode(), source.permissions().mode());
    }

    /// No diff panics the applier or writes outside the rootfs: mutations
    /// of a diff holding every kind it accepts, and of `deleted.files`,
    /// applied to a rootfs with a symlink pointing out of it.
    #[test]
    fn mutated_diffs_never_panic_or_escape() {
        let seed_tar = diff_tar(|b| {
            file_entry(b, "data/state", b"42");
            file_entry(b, "escape/planted", b"x");
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_mode(0o755);
            b.append_data(&mut h, "dir/", std::io::empty()).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "data/link", "../../escape").unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Fifo);
            h.set_size(0);
            b.append_data(&mut h, "data/fifo", std::io::empty())
                .unwrap();
            b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])])
                .unwrap();
            file_entry(b, "data/attr", b"a");
        });
        let seed_deleted = br#"["/old","/escape/keep","/dir/x"]"#.to_vec();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let jail = tempfile::tempdir().unwrap();
        let outside = jail.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"1").unwrap();
        let mutate = |seed: &[u8], next: &mut dyn FnMut() -> u64| {
            let mut b = seed.to_vec();
            for _ in 0..(1 + next() % 6) {
                let i = (next() as usize) % b.len();
                b[i] = match next() % 4 {
                    0 => 0,
                    1 => b'/',
                    2 => b'.',
                    _ => next() as u8,
                };
            }
            b
        };
        for i in 0..600 {
            let rootfs = jail.path().join(format!("rootfs-{i}"));
            std::fs::create_dir(&rootfs).unwrap();
            std::fs::write(rootfs.join("old"), b"x").unwrap();
            std::os::unix::fs::symlink(&outside, rootfs.join("escape")).unwrap();
            let staged = tempfile::tempdir().unwrap();
            let (tar, deleted) = match i % 3 {
                0 => (mutate(&seed_tar, &mut next), seed_deleted.clone()),
                1 => (seed_tar.clone(), mutate(&seed_deleted, &mut next)),
                _ => (
                    mutate(&seed_tar, &mut next),
                    mutate(&seed_deleted, &mut next),
                ),
            };
            std::fs::write(staged.path().join(members::ROOTFS_DIFF), tar).unwrap();
            std::fs::write(staged.path().join(members::DELETED), deleted).unwrap();
            let _ = apply(staged.path(), &rootfs);
            let left: Vec<_> = std::fs::read_dir(&outside)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert_eq!(left, vec![std::ffi::OsString::from("keep")], "case {i}");
            std::fs::remove_dir_all(&rootfs).unwrap();
        }
    }

    #[test]
    fn long_names_travel_and_huge_extension_headers_are_refused() {
        let rootfs = tempfile::tempdir().unwrap();
        let staged = tempfile::tempdir().unwrap();
        let deep = format!("{}/file", "d".repeat(120));
        let tar = diff_tar(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(2);
            h.set_mode(0o644);
            b.append_data(&mut h, &deep, &b"ok"[..]).unwrap();
        });
        std::fs::write(staged.path().join(members::ROOTFS_DIFF), tar).unwrap();
        apply(staged.path(), rootfs.path()).unwrap();
        assert_eq!(std::fs::read(rootfs.path().join(&deep)).unwrap(), b"ok");

        // A GNU long name that claims 64 MiB: refused, not read.
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(64 << 20);
        h.set_path("././@LongLink").unwrap();
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend(vec![b'a'; 4096]);
        std::fs::write(staged.path().join(members::ROOTFS_DIFF), bytes).unwrap();
        let err = apply(staged.path(), rootfs.path()).unwrap_err().to_string();
        assert!(err.contains("extension header"), "{err}");
        assert!(pax_records(b"13 path=/x/y\n").unwrap() == vec![(&b"path"[..], &b"/x/y"[..])]);
        for bad in [&b"5 a=b"[..], b"99 a=b\n", b"x a=b\n", b"6 ab\n"] {
            assert!(pax_records(bad).is_err(), "{bad:?}");
        }
    }
}
