//! Finding and opening an archive on the share.
//!
//! A restore names either an exact archive (`job/20260101T...Z.criu.tar.zst`)
//! or a key (`job`), meaning the newest complete archive under it. Hidden
//! files (`.NAME.partial-PID`, archives still being written) are never
//! candidates.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::publish::{check_name, check_share, SUFFIXES};
use crate::error::{Error, Result};

pub fn is_archive_name(name: &str) -> bool {
    SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The share reference for one container. Pod annotations reach every
/// container of a pod, so for a container of a pod (`container_name` from
/// the CRI) a key names the pod's checkpoints and each container's archives
/// live under `KEY/<container name>/`; the name is the one in the pod
/// manifest, so the restored pod finds each container's own archive. Exact
/// archive names, and containers outside pods, are used as they are.
pub fn per_container(reference: &str, container_name: Option<&str>) -> String {
    match container_name.filter(|n| !n.is_empty()) {
        Some(name) if !is_archive_name(reference) => {
            format!("{}/{name}", reference.trim_end_matches('/'))
        }
        _ => reference.to_string(),
    }
}

/// The archive `reference` denotes on `share`.
pub fn resolve(share: &Path, reference: &str) -> Result<PathBuf> {
    check_share(share)?;
    let rel = check_name(reference)?;
    let path = share.join(rel);
    if is_archive_name(reference) {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::NotFound(format!(
                "archive {reference} not found on the share {}",
                share.display()
            )))
        };
    }
    // The listing may be stale on a network file system; markers are
    // looked up by name, so they win. Archives published without markers
    // are still found by listing.
    let newest = match super::sequence::newest(&path)? {
        Some(archive) => Some(archive),
        None => newest_in(&path),
    };
    newest.ok_or_else(|| {
        Error::NotFound(format!(
            "no archive under {reference}/ on the share {} (is the checkpoint published, \
             and the share mounted on this node?)",
            share.display()
        ))
    })
}

/// Complete archives directly under `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            !n.starts_with('.') && is_archive_name(&n)
        })
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn newest_in(dir: &Path) -> Option<PathBuf> {
    list(dir).pop()
}

/// [`resolve`], retried for up to `wait` while nothing is found: another
/// node's archive can take a while to show up on a network file system.
pub fn resolve_waiting(share: &Path, reference: &str, wait: Duration) -> Result<PathBuf> {
    let deadline = Instant::now() + wait;
    loop {
        match resolve(share, reference) {
            Err(Error::NotFound(msg)) if Instant::now() < deadline => {
                log::debug!("{msg}; waiting for it to appear");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(Error::NotFound(msg)) if !wait.is_zero() => {
                return Err(Error::NotFound(format!(
                    "{msg}; waited {} s (CRIU_SHIM_FETCH_WAIT)",
                    wait.as_secs()
                )))
            }
            other => return other,
        }
    }
}

pub fn open(path: &Path) -> Result<(File, u64)> {
    let f =
        File::open(path).map_err(|e| Error::io(format!("open archive {}", path.display()), e))?;
    let size = f
        .metadata()
        .map_err(|e| Error::io(format!("stat archive {}", path.display()), e))?
        .len();
    Ok((f, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_means_the_newest_complete_archive() {
        let share = tempfile::tempdir().unwrap();
        let job = share.path().join("job");
        std::fs::create_dir_all(&job).unwrap();
        for n in [
            "20260101T000000.000Z.criu.tar.zst",
            "20260102T000000.000Z.criu.tar.zst",
            ".20260103T000000.000Z.criu.tar.zst.partial-7",
            "notes.txt",
        ] {
            std::fs::write(job.join(n), b"x").unwrap();
        }
        assert_eq!(
            resolve(share.path(), "job").unwrap(),
            job.join("20260102T000000.000Z.criu.tar.zst")
        );
        let err = resolve(share.path(), "other").unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        let err = resolve(share.path(), "job/missing.criu.tar.zst").unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        assert!(resolve(share.path(), "../etc").is_err());
    }

    #[test]
    fn a_pod_key_names_one_directory_per_container() {
        assert_eq!(per_container("job", Some("web")), "job/web");
        assert_eq!(per_container("job/", Some("web")), "job/web");
        assert_eq!(per_container("job", None), "job");
        assert_eq!(per_container("job", Some("")), "job");
        let exact = "job/web/20260101T000000.000Z.criu.tar.zst";
        assert_eq!(per_container(exact, Some("web")), exact);
    }
}
