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
//! names a complete archive. They come from the share: each is read
//! through [`Dir`] (no symlinks, regular files only), at most
//! [`MAX_MARKER`] bytes, and must hold one plain archive file name.

use std::io::Write;

use super::share::{is_archive_name, Dir, Kind};
use crate::error::{Error, Result};

const PREFIX: &str = ".seq-";
/// A marker holds one file name.
const MAX_MARKER: u64 = 255;
/// How far past the listing a reader probes (a stale listing lags by a
/// few publishes, not thousands).
const MAX_PROBES: u64 = 10_000;

fn marker(n: u64) -> String {
    format!("{PREFIX}{n:010}")
}

fn number(file_name: &str) -> Option<u64> {
    file_name.strip_prefix(PREFIX)?.parse().ok()
}

/// Sequence numbers of the markers a listing of `dir` shows (maybe stale).
pub fn listed(dir: &Dir) -> Vec<u64> {
    let mut out: Vec<u64> = dir
        .entries()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(n, _)| number(&n))
        .collect();
    out.sort_unstable();
    out
}

/// Records the archive `name` (a file in `dir`) as the newest of its key.
pub fn record(dir: &Dir, name: &str) -> Result<u64> {
    let tmp = format!(".seq-new-{}", std::process::id());
    let result = write_marker(dir, &tmp, name).and_then(|()| claim_next(dir, &tmp));
    let _ = dir.remove(&tmp);
    result
}

fn write_marker(dir: &Dir, tmp: &str, name: &str) -> Result<()> {
    let _ = dir.remove(tmp);
    let mut f = dir.create_new(tmp)?;
    f.write_all(name.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("write {}", dir.path().join(tmp).display()), e))
}

/// Moves `tmp` to the first free marker number above the highest seen.
fn claim_next(dir: &Dir, tmp: &str) -> Result<u64> {
    let mut n = newest_number(dir) + 1;
    for _ in 0..MAX_PROBES {
        match dir.rename_noreplace(tmp, &marker(n)) {
            Ok(()) => return Ok(n),
            Err(Error::AlreadyExists(_)) => n += 1,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Other(format!(
        "no free sequence marker in {}",
        dir.path().display()
    )))
}

/// The highest marker number that exists: the listing's highest, then
/// probed upward by name (lookups are not served from a stale listing).
fn newest_number(dir: &Dir) -> u64 {
    let mut n = listed(dir).last().copied().unwrap_or(0);
    for _ in 0..MAX_PROBES {
        if dir.stat(&marker(n + 1)).is_none() {
            break;
        }
        n += 1;
    }
    n
}

/// The newest archive's name in `dir` by its markers; None without
/// markers or when the newest marker's archive is gone.
pub fn newest(dir: &Dir) -> Result<Option<String>> {
    let n = newest_number(dir);
    if n == 0 {
        return Ok(None);
    }
    let Some(name) = read_marker(dir, n)? else {
        return Ok(None);
    };
    let is_file = dir.stat(&name).map(|s| s.kind) == Some(Kind::File);
    Ok(is_file.then_some(name))
}

/// A marker's content, checked to be one plain archive file name.
fn read_marker(dir: &Dir, n: u64) -> Result<Option<String>> {
    let bad = || {
        Error::InvalidArgument(format!(
            "sequence marker {} does not name an archive; remove it",
            dir.path().join(marker(n)).display()
        ))
    };
    let bytes = match dir.read_small(&marker(n), MAX_MARKER) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(Error::InvalidArgument(_)) => return Err(bad()),
        Err(e) => return Err(e),
    };
    let name = String::from_utf8(bytes).map_err(|_| bad())?;
    let plain =
        !name.is_empty() && !name.contains('/') && !name.contains('\0') && !name.starts_with('.');
    if !plain || !is_archive_name(&name) {
        return Err(bad());
    }
    Ok(Some(name))
}

/// Removes the markers naming the archive `name` (an archive taken back).
pub fn forget(dir: &Dir, name: &str) {
    for n in listed(dir) {
        if matches!(read_marker(dir, n), Ok(Some(m)) if m == name) {
            let _ = dir.remove(&marker(n));
        }
    }
}

/// Markers whose archive is gone, except the newest (it keeps the count).
pub fn orphans(dir: &Dir) -> Vec<String> {
    let all = listed(dir);
    let Some((_, older)) = all.split_last() else {
        return Vec::new();
    };
    older
        .iter()
        .filter(|&&n| match read_marker(dir, n) {
            Ok(Some(name)) => dir.stat(&name).is_none(),
            _ => false,
        })
        .map(|&n| marker(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::share::Share;
    use super::*;

    fn dir(path: &std::path::Path) -> Dir {
        Share::open(path).unwrap().create_dir("k").unwrap()
    }

    #[test]
    fn markers_count_up_and_name_the_newest_archive() {
        let root = tempfile::tempdir().unwrap();
        let d = dir(root.path());
        let p = root.path().join("k");
        assert_eq!(newest(&d).unwrap(), None);
        for name in ["b.criu.tar.zst", "a.criu.tar.zst"] {
            std::fs::write(p.join(name), b"x").unwrap();
        }
        assert_eq!(record(&d, "b.criu.tar.zst").unwrap(), 1);
        // Published later, even if its name sorts first.
        assert_eq!(record(&d, "a.criu.tar.zst").unwrap(), 2);
        assert_eq!(newest(&d).unwrap().as_deref(), Some("a.criu.tar.zst"));
        // A marker the listing does not show yet is still found by name.
        std::fs::write(p.join("c.criu.tar.zst"), b"x").unwrap();
        std::fs::write(p.join(marker(3)), "c.criu.tar.zst").unwrap();
        assert_eq!(newest_number(&d), 3);
        assert_eq!(newest(&d).unwrap().as_deref(), Some("c.criu.tar.zst"));
        // Only markers are left: no temporary files.
        let hidden: Vec<_> = std::fs::read_dir(&p)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".seq-new"))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
    }

    #[test]
    fn hostile_markers_are_refused_and_orphans_found() {
        let root = tempfile::tempdir().unwrap();
        let d = dir(root.path());
        let p = root.path().join("k");
        std::fs::write(p.join(marker(1)), "gone.criu.tar.zst").unwrap();
        std::fs::write(p.join(marker(2)), "../../etc/passwd.criu.tar.zst").unwrap();
        let err = newest(&d).unwrap_err();
        assert!(
            err.to_string().contains("does not name an archive"),
            "{err}"
        );
        assert_eq!(orphans(&d), vec![marker(1)]);
        forget(&d, "gone.criu.tar.zst");
        assert_eq!(listed(&d), vec![2]);
        // A marker that is a symlink to an endless file, or a FIFO, is
        // refused without reading it.
        std::fs::remove_file(p.join(marker(2))).unwrap();
        std::os::unix::fs::symlink("/dev/zero", p.join(marker(2))).unwrap();
        assert!(newest(&d).is_err());
        std::fs::remove_file(p.join(marker(2))).unwrap();
        nix::unistd::mkfifo(
            &p.join(marker(2)),
            nix::sys::stat::Mode::from_bits(0o600).unwrap(),
        )
        .unwrap();
        assert!(newest(&d).is_err());
        std::fs::remove_file(p.join(marker(2))).unwrap();
        std::fs::write(p.join(marker(2)), vec![b'a'; 4096]).unwrap();
        assert!(newest(&d).is_err());
    }
}
