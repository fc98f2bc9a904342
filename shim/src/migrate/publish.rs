//! Publishing to the share, atomically: write under a hidden temporary
//! name, fsync, rename to the final name without replacing anything, fsync
//! the directory. A reader (another node) sees either no archive or the
//! whole one; an existing archive is never overwritten; on any failure the
//! temporary file is removed.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Archives are named `<key>/<timestamp>.criu.tar.zst` (or `.criu.tar`).
pub const SUFFIXES: [&str; 2] = [".criu.tar.zst", ".criu.tar"];

/// Checks that `name` is a plain relative path inside the share.
pub fn check_name(name: &str) -> Result<&Path> {
    let p = Path::new(name);
    let ok = !name.is_empty()
        && p.components().all(|c| match c {
            Component::Normal(s) => !s.to_string_lossy().starts_with('.'),
            _ => false,
        });
    if ok {
        Ok(p)
    } else {
        Err(Error::InvalidArgument(format!(
            "archive name {name:?} must be a relative path inside the share \
             (no '..', no leading '/', no hidden components)"
        )))
    }
}

pub fn check_share(share: &Path) -> Result<()> {
    match std::fs::metadata(share) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(Error::FailedPrecondition(format!(
            "share directory {} does not exist: mount the shared file system there \
             or set CRIU_SHIM_SHARE_DIR",
            share.display()
        ))),
    }
}

#[derive(Debug)]
pub struct Published {
    pub path: PathBuf,
    pub size: u64,
}

/// Writes an archive named `name` on `share` with `write`, atomically.
pub fn publish(
    share: &Path,
    name: &str,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<Published> {
    check_share(share)?;
    let rel = check_name(name)?;
    let target = share.join(rel);
    let dir = target.parent().expect("a name has a parent").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    if target.exists() {
        return Err(Error::AlreadyExists(format!(
            "archive {} already exists; it is never overwritten: pick another name or remove it",
            target.display()
        )));
    }
    let file_name = target
        .file_name()
        .expect("has a name")
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.partial-{}", std::process::id()));
    let result = write_then_rename(&tmp, &target, &dir, write);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let published = result?;
    // The archive is whole and in place; now readers may be pointed at it.
    if let Err(e) = super::sequence::record(&dir, &published.path) {
        log::warn!(
            "published {} but could not record it as the newest of its key ({e}); \
             restores by key fall back to listing the directory",
            published.path.display()
        );
    }
    Ok(published)
}

fn write_then_rename(
    tmp: &Path,
    target: &Path,
    dir: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<Published> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    write(&mut out)?;
    let file = out
        .into_inner()
        .map_err(|e| full_or(e.into_error(), "flush archive".into()))?;
    file.sync_all()
        .map_err(|e| full_or(e, format!("fsync {}", tmp.display())))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    drop(file);
    rename_noreplace(tmp, target)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", dir.display()), e))?;
    Ok(Published {
        path: target.to_path_buf(),
        size,
    })
}

fn full_or(e: std::io::Error, what: String) -> Error {
    Error::io_or_full(what, e, "the share is full; free space and retry")
}

/// rename(2) that fails instead of replacing an existing file. File systems
/// without RENAME_NOREPLACE (some FUSE ones) get link+unlink, which is
/// equally exclusive.
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) => Err(Error::AlreadyExists(format!(
            "archive {} appeared while writing; not overwritten",
            to.display()
        ))),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {
            std::fs::hard_link(from, to).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::AlreadyExists(format!(
                        "archive {} exists; not overwritten",
                        to.display()
                    ))
                } else {
                    Error::io(format!("link {}", to.display()), e)
                }
            })?;
            std::fs::remove_file(from).map_err(|e| Error::io("remove temporary archive", e))
        }
        Err(e) => Err(Error::io(format!("rename to {}", to.display()), e.into())),
    }
}

/// A new archive name under `key`: `<key>/<UTC time>.criu.tar.zst`.
pub fn new_name(key: &str, compressed: bool) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{key}/{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z{}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_millis(),
        if compressed { SUFFIXES[0] } else { SUFFIXES[1] }
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_atomically_and_never_overwrites() {
        let share = tempfile::tempdir().unwrap();
        let p = publish(share.path(), "job/a.criu.tar", |w| {
            w.write_all(b"hello").map_err(|e| Error::io("w", e))
        })
        .unwrap();
        assert_eq!(std::fs::read(&p.path).unwrap(), b"hello");
        assert_eq!(p.size, 5);
        let err = publish(share.path(), "job/a.criu.tar", |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        assert_eq!(std::fs::read(&p.path).unwrap(), b"hello");
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let share = tempfile::tempdir().unwrap();
        let err = publish(share.path(), "job/b.criu.tar", |w| {
            w.write_all(b"half").unwrap();
            Err(Error::Other("CRIU died".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("CRIU died"));
        let left: Vec<_> = std::fs::read_dir(share.path().join("job"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn missing_share_and_bad_names_are_explained() {
        let err = publish(Path::new("/nonexistent/share"), "a", |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("CRIU_SHIM_SHARE_DIR"), "{err}");
        for bad in ["../x", "/etc/x", "a/../../x", ".hidden", ""] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_name("job/20260101T000000.000Z.criu.tar.zst").is_ok());
    }

    #[test]
    fn names_sort_by_time() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        let n = new_name("job", true);
        assert!(
            n.starts_with("job/20") && n.ends_with(".criu.tar.zst"),
            "{n}"
        );
    }
}
