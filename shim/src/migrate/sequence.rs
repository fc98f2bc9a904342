//! Finding a key's newest archive without trusting directory listings.
//!
//! Network file systems cache directory listings: sshfs for 20 s, NFS up
//! to `acdirmax`. A node that listed a key a moment ago may not see the
//! archive another node has just published, or worse, may pick an older
//! one and restore stale state. Looking a file up by name goes to the
//! server on these file systems. So every published archive also gets a
//! sequence marker `.seq-NNNNNNNNNN` next to it: created exclusively (two
//! publishers never get the same number), never changed afterwards, and
//! holding only the archive's file name. A reader probes markers by name
//! upward from the highest one it can list; the last marker that exists
//! names the newest archive.
//!
//! Markers are written after their archive is in place, so a marker always
//! names a complete archive. Their content comes from the share and is
//! checked like any other name from it: one plain archive file name.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::fetch::is_archive_name;
use super::publish::rename_noreplace;
use crate::error::{Error, Result};

const PREFIX: &str = ".seq-";

fn marker(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{n:010}"))
}

fn number(file_name: &str) -> Option<u64> {
    file_name.strip_prefix(PREFIX)?.parse().ok()
}

/// Sequence numbers of the markers a listing of `dir` shows (maybe stale).
pub fn listed(dir: &Path) -> Vec<u64> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| number(&e.file_name().to_string_lossy()))
        .collect();
    out.sort_unstable();
    out
}

/// Records `archive` (a file in `dir`) as the newest of its key.
pub fn record(dir: &Path, archive: &Path) -> Result<u64> {
    let name = archive
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".seq-new-{}", std::process::id()));
    let result = write_marker(&tmp, &name).and_then(|()| claim_next(dir, &tmp));
    let _ = std::fs::remove_file(&tmp);
    result
}

fn write_marker(tmp: &Path, name: &str) -> Result<()> {
    let mut f = std::fs::File::create(tmp)
        .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    f.write_all(name.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("write {}", tmp.display()), e))
}

/// Moves `tmp` to the first free marker number above the highest seen.
fn claim_next(dir: &Path, tmp: &Path) -> Result<u64> {
    let mut n = newest_number(dir) + 1;
    for _ in 0..10_000 {
        match rename_noreplace(tmp, &marker(dir, n)) {
            Ok(()) => return Ok(n),
            Err(Error::AlreadyExists(_)) => n += 1,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Other(format!(
        "no free sequence marker in {}",
        dir.display()
    )))
}

/// The highest marker number that exists: the listing's highest, then
/// probed upward by name (lookups are not served from a stale listing).
fn newest_number(dir: &Path) -> u64 {
    let mut n = listed(dir).last().copied().unwrap_or(0);
    while marker(dir, n + 1).symlink_metadata().is_ok() {
        n += 1;
    }
    n
}

/// The newest archive in `dir` by its markers; None without markers or
/// when the newest marker's archive is gone.
pub fn newest(dir: &Path) -> Result<Option<PathBuf>> {
    let n = newest_number(dir);
    if n == 0 {
        return Ok(None);
    }
    let path = marker(dir, n);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
    };
    let name = String::from_utf8(bytes).unwrap_or_default();
    let plain = !name.is_empty() && !name.contains('/') && !name.starts_with('.');
    if !plain || !is_archive_name(&name) || name.len() > 255 {
        return Err(Error::InvalidArgument(format!(
            "sequence marker {} does not name an archive; remove it",
            path.display()
        )));
    }
    let archive = dir.join(name);
    Ok(archive.is_file().then_some(archive))
}

/// Removes the markers naming `archive` (an archive taken back).
pub fn forget(dir: &Path, archive: &Path) {
    let Some(name) = archive
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return;
    };
    for n in listed(dir) {
        let m = marker(dir, n);
        if std::fs::read_to_string(&m)
            .map(|s| s.trim() == name)
            .unwrap_or(false)
        {
            let _ = std::fs::remove_file(&m);
        }
    }
}

/// Markers whose archive is gone, except the newest (it keeps the count).
pub fn orphans(dir: &Path) -> Vec<PathBuf> {
    let all = listed(dir);
    let Some((_, older)) = all.split_last() else {
        return Vec::new();
    };
    older
        .iter()
        .map(|&n| marker(dir, n))
        .filter(|m| {
            std::fs::read_to_string(m)
                .map(|name| !dir.join(name.trim()).is_file())
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_count_up_and_name_the_newest_archive() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(newest(d).unwrap(), None);
        for name in ["b.criu.tar.zst", "a.criu.tar.zst"] {
            std::fs::write(d.join(name), b"x").unwrap();
        }
        assert_eq!(record(d, &d.join("b.criu.tar.zst")).unwrap(), 1);
        // Published later, even if its name sorts first.
        assert_eq!(record(d, &d.join("a.criu.tar.zst")).unwrap(), 2);
        assert_eq!(newest(d).unwrap(), Some(d.join("a.criu.tar.zst")));
        // A marker the listing does not show yet is still found by name.
        std::fs::write(d.join("c.criu.tar.zst"), b"x").unwrap();
        std::fs::write(marker(d, 3), "c.criu.tar.zst").unwrap();
        assert_eq!(newest_number(d), 3);
        assert_eq!(newest(d).unwrap(), Some(d.join("c.criu.tar.zst")));
        // Only markers are left: no temporary files.
        let hidden: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".seq-new"))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
    }

    #[test]
    fn hostile_markers_are_refused_and_orphans_found() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(marker(d, 1), "gone.criu.tar.zst").unwrap();
        std::fs::write(marker(d, 2), "../../etc/passwd.criu.tar.zst").unwrap();
        let err = newest(d).unwrap_err();
        assert!(
            err.to_string().contains("does not name an archive"),
            "{err}"
        );
        assert_eq!(orphans(d), vec![marker(d, 1)]);
        forget(d, &d.join("gone.criu.tar.zst"));
        assert_eq!(listed(d), vec![2]);
    }
}
