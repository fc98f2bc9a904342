//! The restore path, share -> verify -> restore, as task Create runs it.
//!
//! 1. [`source`]: what to restore from. containerd's own checkpoint path
//!    (`ctr task start --checkpoint`, containerd's CRI restore), or our
//!    annotation, which names an archive *on the share*: a pod's author
//!    controls annotations, so a path on the node is refused unless the
//!    operator allowed a directory for it (`CRIU_SHIM_LOCAL_IMAGES_DIR`).
//! 2. [`crate::migrate::open_archive`]: authenticate the manifest (the
//!    cluster key's MAC), then fetch and verify into private staging: all
//!    but the memory pages ([`pages`], the default), or the whole archive
//!    (`CRIU_SHIM_RESTORE_FETCH=staged`, archives without a frame table,
//!    nodes without userfaultfd).
//! 3. [`privileges`]: what CRIU will give each process, read from the
//!    images themselves, against the target container's spec. Refused
//!    before CRIU runs if the archive holds more.
//! 4. [`crate::container::Container::create`] applies the writable-layer
//!    changes and has runc restore from the images, tasks left stopped
//!    until Start. Memory not staged is copied in by [`lazy`]: before
//!    Create returns (cold), or as the tasks touch it once they run
//!    (`criu-shim.io/migration: lazy`).

pub mod lazy;
pub mod pages;
pub mod privileges;
pub mod remote;
pub mod source;
mod uffd;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::api;
use criu_shim_config::{RestoreFetch, ShimConfig};

use crate::error::Result;
use crate::messages::{FileMessage, FrontStats};
use crate::migrate::share::Tenant;
use crate::migrate::unpack::{Deadline, Limits};
use crate::migrate::{self, Fetched};
use crate::runc::CriuArgs;
use source::Source;

/// A restore ready for runc: images checked, staging kept alive.
pub struct Prepared {
    pub args: CriuArgs,
    /// The staged archive whose writable-layer changes go onto the rootfs.
    pub rootfs_changes: Option<PathBuf>,
    /// Owns the staging directory (shared with a page source, which keeps
    /// it until every page has moved); dropped once the restore is done.
    fetched: Option<Arc<Fetched>>,
    /// Where the restored tasks' memory comes from when CRIU leaves it to
    /// userfaultfd (the page source owns the staging until every page has
    /// moved).
    pub lazy: Option<Box<dyn lazy::PageSource>>,
    /// A cold restore through userfaultfd: Create returns once every page
    /// is in place (and verified), the tasks still stopped.
    pub pages_before_start: bool,
}

/// Steps 1-3 for one Create; None when it is not a restore.
pub fn prepare(
    req: &api::CreateTaskRequest,
    bundle: &Path,
    config: &ShimConfig,
    deadline: Deadline,
) -> Result<Option<Prepared>> {
    let spec = crate::spec::Spec::read(bundle);
    let Some(src) = source::of(req, &spec, config)? else {
        return Ok(None);
    };
    // A node without a usable CRIU fails here, not after the archive is
    // fetched and unpacked.
    criu_sys::Criu::new(&config.criu)
        .with_reaper(std::sync::Arc::new(crate::reaper::MonitorReaper))
        .version()?;
    // Read before anything is fetched: a spec we cannot read fails fast.
    let allowed = privileges::Allowed::from_bundle(bundle)?;
    let lazy = spec.migration(config.migration)?.runs_early();
    // A lazy restore needs userfaultfd: refused here, before anything is
    // fetched, on a node without it.
    if lazy {
        uffd_support().map_err(|why| {
            crate::error::Error::FailedPrecondition(format!(
                "{}={} for {}: {why}; restore it cold",
                criu_shim_config::ANNOTATION_MIGRATION,
                spec.annotation(criu_shim_config::ANNOTATION_MIGRATION)
                    .unwrap_or("lazy"),
                req.id
            ))
        })?;
    }
    // Memory straight from the share into the restored tasks: for a lazy
    // restore always, for a cold one unless the node says otherwise or
    // cannot (no userfaultfd).
    let stream = lazy || (config.restore_fetch == RestoreFetch::Stream && uffd_support().is_ok());
    let mut prepared = match src {
        Source::Images(images) => Prepared {
            args: CriuArgs {
                image_path: images,
                work_path: bundle.join("restore-work"),
                ..Default::default()
            },
            rootfs_changes: None,
            fetched: None,
            lazy: None,
            pages_before_start: false,
        },
        Source::Archive(reference) => {
            let tenant = spec.tenant()?;
            let (f, pages) = fetch(&reference, &tenant, &req.id, config, deadline, stream)?;
            let pages_before_start = !lazy && pages.is_some();
            Prepared {
                args: CriuArgs {
                    image_path: f.images(),
                    work_path: f.staging.path().join("work"),
                    lazy_pages: pages.is_some(),
                    ..Default::default()
                },
                rootfs_changes: Some(f.staging.path().to_path_buf()),
                fetched: Some(f),
                lazy: pages,
                pages_before_start,
            }
        }
    };
    let checked = Instant::now();
    privileges::check(&prepared.args.image_path, &allowed)?;
    log::info!(
        "{}: images within the container's privileges (checked in {:?})",
        req.id,
        checked.elapsed()
    );
    if lazy && prepared.lazy.is_none() {
        prepared.go_lazy();
    }
    Ok(Some(prepared))
}

/// userfaultfd with the events CRIU needs, asked of the kernel once (and
/// logged once when missing).
fn uffd_support() -> std::result::Result<(), String> {
    static SUPPORT: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    SUPPORT
        .get_or_init(|| {
            let support = uffd::available();
            if let Err(why) = &support {
                log::warn!(
                    "{why}: restores unpack archives into staging first, lazy restores are \
                     refused"
                );
            }
            support
        })
        .clone()
}

/// Most failed-restore logs kept per node, and most bytes of each.
const KEPT_LOGS: usize = 20;
const KEPT_LOG_BYTES: u64 = 256 << 10;

impl Prepared {
    /// Restore without the memory, served from the staged images once the
    /// tasks run.
    fn go_lazy(&mut self) {
        let keep: Box<dyn Send> = match &self.fetched {
            Some(fetched) => Box::new(fetched.clone()),
            None => Box::new(()),
        };
        let images = self.args.image_path.clone();
        self.lazy = Some(Box::new(pages::StagedPages::new(&images, keep)));
        self.args.lazy_pages = true;
    }

    /// After a failed restore: CRIU's log (its last 256 KiB) is kept in
    /// `<staging>/failed-restores/`, since the staging it was in goes
    /// away with the failure; only the newest 20 are kept. Returns where.
    pub fn keep_failed_log(&self, staging_root: &Path, id: &str) -> Option<PathBuf> {
        // Only when CRIU is what failed: after a restore CRIU finished (its
        // memory then failed verification, say), its log tells nothing.
        FrontStats::read(&self.args.work_path)?.error?;
        let log = self.args.work_path.join("restore.log");
        let mut f = std::fs::File::open(&log).ok()?;
        let len = f.metadata().ok()?.len();
        use std::io::{Read, Seek, SeekFrom};
        f.seek(SeekFrom::Start(len.saturating_sub(KEPT_LOG_BYTES)))
            .ok()?;
        let mut tail = Vec::new();
        f.take(KEPT_LOG_BYTES).read_to_end(&mut tail).ok()?;
        let dir = staging_root.join("failed-restores");
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)
            .ok()?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let kept = dir.join(format!("{id}-{stamp}.log"));
        crate::migrate::stage::write_private(&kept, &tail).ok()?;
        prune_logs(&dir);
        Some(kept)
    }
}

/// Only the newest [`KEPT_LOGS`] logs stay.
fn prune_logs(dir: &Path) {
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    logs.sort();
    let excess = logs.len().saturating_sub(KEPT_LOGS);
    for (_, p) in &logs[..excess] {
        let _ = std::fs::remove_file(p);
    }
}

/// The archive into staging: whole, or (`stream`) all but the memory its
/// page source will serve (see [`pages`]).
fn fetch(
    reference: &str,
    tenant: &Tenant,
    id: &str,
    config: &ShimConfig,
    deadline: Deadline,
    stream: bool,
) -> Result<(Arc<Fetched>, Option<pages::Source>)> {
    let started = Instant::now();
    let key = migrate::mac::configured(config.archive_key_file.as_deref())?;
    let opened = migrate::open_archive(&migrate::FetchRequest {
        share: &config.share_dir,
        tenant,
        reference,
        staging_root: &config.staging_dir,
        id,
        wait: Duration::from_secs(config.fetch_wait_secs),
        mac_key: key.as_deref(),
        cross_tenant: config.allow_cross_tenant,
        limits: Limits::from_config(config),
        deadline,
    })?;
    let timeout = Duration::from_secs(config.lazy_timeout_secs);
    let (f, source) = if let Some(src) = opened.manifest().page_source.clone() {
        // Post-copy: the memory is with the source node, nowhere else.
        let key = key.as_deref().ok_or_else(|| {
            crate::error::Error::FailedPrecondition(format!(
                "{reference} is a post-copy checkpoint: its memory comes from the source \
                 node over a stream authenticated with the cluster key, and this node has \
                 none; set CRIU_SHIM_ARCHIVE_KEY_FILE"
            ))
        })?;
        uffd_support().map_err(|why| {
            crate::error::Error::FailedPrecondition(format!(
                "{reference} is a post-copy checkpoint, which needs userfaultfd: {why}"
            ))
        })?;
        let f = Arc::new(opened.fetch_all()?);
        let remote = remote::RemotePages::connect(&src, key, timeout)?;
        (f, Some(Box::new(remote) as pages::Source))
    } else if stream {
        pages::fetch_from_share(opened, timeout)?
    } else {
        (Arc::new(opened.fetch_all()?), None)
    };
    log::info!(
        "fetched and verified {} for {id} in {:?} (checkpoint of {}, CRIU {})",
        f.archive.display(),
        started.elapsed(),
        f.manifest.container_id,
        f.manifest.criu_version
    );
    Ok((f, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_restore_s_log_is_kept_bounded_and_the_newest_20_stay() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let mut log = vec![b'x'; 300 << 10];
        log.extend_from_slice(b"Error (criu/cr-restore.c:1): the end");
        std::fs::write(work.join("restore.log"), &log).unwrap();
        let stats = |error: Option<&str>| crate::messages::FrontStats {
            criu_ms: 1.0,
            frozen_ms: None,
            error: error.map(|m| crate::messages::FrontFailure {
                kind: crate::messages::FailureKind::Criu,
                message: m.into(),
            }),
        };
        let p = Prepared {
            args: CriuArgs {
                work_path: work.clone(),
                ..Default::default()
            },
            rootfs_changes: None,
            fetched: None,
            lazy: None,
            pages_before_start: false,
        };
        let staging = root.path().join("staging");
        // CRIU restored, and something after it failed: its log tells nothing.
        stats(None).write(&work).unwrap();
        assert!(p.keep_failed_log(&staging, "ok").is_none());
        stats(Some("restore failed")).write(&work).unwrap();
        let kept = p.keep_failed_log(&staging, "app").unwrap();
        let text = std::fs::read(&kept).unwrap();
        assert_eq!(text.len() as u64, KEPT_LOG_BYTES);
        assert!(text.ends_with(b"the end"));
        for i in 0..25 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            p.keep_failed_log(&staging, &format!("c{i}")).unwrap();
        }
        let left = std::fs::read_dir(staging.join("failed-restores"))
            .unwrap()
            .count();
        assert_eq!(left, KEPT_LOGS);
        // No log (the restore failed before CRIU ran): nothing kept.
        std::fs::remove_file(work.join("restore.log")).unwrap();
        assert!(p.keep_failed_log(&staging, "none").is_none());
    }
}
