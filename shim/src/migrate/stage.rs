//! Staging: a private directory on local disk per checkpoint or restore,
//! removed when dropped (success or failure), and what goes into it beside
//! CRIU's images: the spec and the container's writable-layer changes.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::members;
use crate::error::{Error, Result};

pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// A fresh directory `<root>/<prefix>-<pid>-XXXXXX` (0700; the root is
    /// made 0700 too if missing). Memory images hold the container's
    /// secrets. The pid says which shim owns it, for [`sweep`].
    pub fn new(root: &Path, prefix: &str) -> Result<Staging> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| Error::io(format!("create staging root {}", root.display()), e))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-{}-", std::process::id()))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(root)
            .map_err(|e| Error::io(format!("create staging dir in {}", root.display()), e))?
            .keep();
        Ok(Staging { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn images(&self) -> PathBuf {
        self.dir.join(members::IMAGES_DIR)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove staging {}: {e}", self.dir.display());
            }
        }
    }
}

/// Removes what shims that died left in the staging root `root`: the
/// directories whose owner pid no longer runs (a shim killed in the middle
/// of a checkpoint or restore). Live shims' directories are left alone.
/// Returns what was removed, for the log.
pub fn sweep(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner(&name) else {
            continue;
        };
        let alive = !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if alive || !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// `dump-app-1234-AbC123` -> 1234.
fn owner(name: &str) -> Option<i32> {
    let mut parts = name.rsplitn(3, '-');
    let _random = parts.next()?;
    let pid: i32 = parts.next()?.parse().ok()?;
    let kind = parts.next()?;
    let ours = ["dump-", "publish-", "restore-"]
        .iter()
        .any(|p| kind.starts_with(p));
    (ours && pid > 0).then_some(pid)
}

/// The overlay upper directory of a rootfs mount, where a container's
/// writes land.
pub fn upperdir(options: &[String]) -> Option<PathBuf> {
    options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
}

/// Writes `rootfs-diff.tar` (everything the container added or changed)
/// and `deleted.files` (what it removed: overlay whiteouts, and opaque
/// directories whose lower contents it hid) into `dir`.
pub fn write_rootfs_diff(upper: &Path, dir: &Path) -> Result<()> {
    let tar_file = private_file(&dir.join(members::ROOTFS_DIFF))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(tar_file));
    tar.follow_symlinks(false);
    let mut deleted = Vec::new();
    walk(upper, upper, &mut tar, &mut deleted)?;
    tar.into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(|e| Error::io("write rootfs-diff.tar", e))?;
    let list = serde_json::to_vec(&deleted).expect("strings serialize");
    write_private(&dir.join(members::DELETED), &list)
}

/// A new file only its owner may read, holding `data`.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    std::io::Write::write_all(&mut private_file(path)?, data)
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// A new file only its owner may read.
pub fn private_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))
}

/// [`private_file`], its missing parent directories made private too.
pub fn private_file_in_new_dirs(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
    }
    private_file(path)
}

fn walk(
    root: &Path,
    dir: &Path,
    tar: &mut tar::Builder<std::io::BufWriter<File>>,
    deleted: &mut Vec<String>,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("read {}", dir.display()), e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("under root");
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            // An overlay whiteout: the file was deleted.
            deleted.push(format!("/{}", rel.display()));
            continue;
        }
        if ft.is_dir() && is_opaque(&path) {
            deleted.push(format!("/{}", rel.display()));
        }
        if ft.is_dir() || ft.is_file() {
            let attrs = super::xattrs::read(&path);
            let keys: Vec<String> = attrs
                .iter()
                .map(|(n, _)| format!("{}{n}", super::xattrs::PAX_PREFIX))
                .collect();
            tar.append_pax_extensions(
                keys.iter()
                    .map(String::as_str)
                    .zip(attrs.iter().map(|(_, v)| v.as_slice())),
            )
            .map_err(|e| Error::io(format!("archive attributes of {}", path.display()), e))?;
        }
        if ft.is_fifo() {
            // A process may hold it open, and CRIU reopens it by path. (The
            // tar crate names special files by their source path: build
            // the header here.)
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Fifo);
            h.set_mode(meta.mode() & 0o7777);
            h.set_uid(meta.uid().into());
            h.set_gid(meta.gid().into());
            h.set_mtime(meta.mtime().max(0) as u64);
            h.set_size(0);
            tar.append_data(&mut h, rel, std::io::empty())
                .map_err(|e| Error::io(format!("archive {}", path.display()), e))?;
        } else if ft.is_dir() || ft.is_file() || ft.is_symlink() {
            tar.append_path_with_name(&path, rel)
                .map_err(|e| Error::io(format!("archive {}", path.display()), e))?;
        } else {
            log::warn!("rootfs diff: skipping special file {}", path.display());
        }
        if ft.is_dir() {
            walk(root, &path, tar, deleted)?;
        }
    }
    Ok(())
}

fn is_opaque(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut v = [0u8; 4];
    for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        // SAFETY: reads at most 4 bytes into `v`.
        let n =
            unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if n == 1 && v[0] == b'y' {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_upperdir() {
        let o = vec![
            "index=off".to_string(),
            "lowerdir=/a:/b".to_string(),
            "upperdir=/snap/12/fs".to_string(),
            "workdir=/snap/12/work".to_string(),
        ];
        assert_eq!(upperdir(&o), Some(PathBuf::from("/snap/12/fs")));
        assert_eq!(upperdir(&[]), None);
    }

    #[test]
    fn diff_holds_changes_and_whiteouts_become_deletions() {
        let upper = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(upper.path().join("data")).unwrap();
        std::fs::write(upper.path().join("data/state"), b"42").unwrap();
        std::os::unix::fs::symlink("state", upper.path().join("data/link")).unwrap();
        nix::sys::stat::mknod(
            &upper.path().join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits(0o600).unwrap(),
            0,
        )
        .unwrap();
        write_rootfs_diff(upper.path(), out.path()).unwrap();
        let deleted: Vec<String> =
            serde_json::from_slice(&std::fs::read(out.path().join(members::DELETED)).unwrap())
                .unwrap();
        assert_eq!(deleted, vec!["/gone".to_string()]);
        let mut ar = tar::Archive::new(File::open(out.path().join(members::ROOTFS_DIFF)).unwrap());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["data", "data/link", "data/state"]);
    }

    #[test]
    fn sweep_removes_only_what_dead_shims_left() {
        let root = tempfile::tempdir().unwrap();
        let live = Staging::new(root.path(), "dump-app").unwrap();
        // A pid that cannot run: above the kernel's pid_max limit.
        let dead = root.path().join("restore-web-1-2-4194305-AbC123");
        std::fs::create_dir_all(dead.join("checkpoint")).unwrap();
        let other = root.path().join("not-ours");
        std::fs::create_dir(&other).unwrap();
        assert_eq!(sweep(root.path()), vec![dead.clone()]);
        assert!(live.path().exists() && other.exists() && !dead.exists());
        assert_eq!(owner("dump-a-b-77-XyZ123"), Some(77));
        assert_eq!(owner("dump-77"), None);
    }

    #[test]
    fn staging_is_private_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let p = {
            let s = Staging::new(&root.path().join("staging"), "ckpt").unwrap();
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(s.path()), 0o700);
            assert_eq!(mode(&root.path().join("staging")), 0o700);
            std::fs::write(s.path().join("x"), b"1").unwrap();
            s.path().to_path_buf()
        };
        assert!(!p.exists());
    }
}
