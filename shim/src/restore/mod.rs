//! The restore path, share -> verify -> restore, as task Create runs it.
//!
//! 1. [`source`]: what to restore from. containerd's own checkpoint path
//!    (`ctr task start --checkpoint`, containerd's CRI restore), or our
//!    annotation, which names an archive *on the share*: a pod's author
//!    controls annotations, so a path on the node is refused unless the
//!    operator allowed a directory for it (`CRIU_SHIM_LOCAL_IMAGES_DIR`).
//! 2. [`crate::migrate::fetch_archive`]: fetch, unpack and verify the
//!    archive into private staging (digests, and the cluster key's MAC).
//! 3. [`privileges`]: what CRIU will give each process, read from the
//!    images themselves, against the target container's spec. Refused
//!    before CRIU runs if the archive holds more.
//! 4. [`crate::container::Container::create`] applies the writable-layer
//!    changes and has runc restore from the images, tasks left stopped
//!    until Start.

pub mod privileges;
pub mod source;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_shim::api;
use criu_shim_config::ShimConfig;

use crate::error::Result;
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
    /// Owns the staging directory; dropped once the restore is done.
    _fetched: Option<Fetched>,
}

/// Steps 1-3 for one Create; None when it is not a restore.
pub fn prepare(
    req: &api::CreateTaskRequest,
    bundle: &Path,
    config: &ShimConfig,
    deadline: Deadline,
) -> Result<Option<Prepared>> {
    let Some(src) = source::of(req, bundle, config)? else {
        return Ok(None);
    };
    // Read before anything is fetched: a spec we cannot read fails fast.
    let allowed = privileges::Allowed::from_bundle(bundle)?;
    let prepared = match src {
        Source::Images(images) => Prepared {
            args: CriuArgs {
                image_path: images,
                work_path: bundle.join("restore-work"),
                ..Default::default()
            },
            rootfs_changes: None,
            _fetched: None,
        },
        Source::Archive(reference) => {
            let tenant = crate::spec::Spec::read(bundle).tenant()?;
            let f = fetch(&reference, &tenant, &req.id, config, deadline)?;
            Prepared {
                args: CriuArgs {
                    image_path: f.images(),
                    work_path: f.staging.path().join("work"),
                    ..Default::default()
                },
                rootfs_changes: Some(f.staging.path().to_path_buf()),
                _fetched: Some(f),
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
    Ok(Some(prepared))
}

fn fetch(
    reference: &str,
    tenant: &Tenant,
    id: &str,
    config: &ShimConfig,
    deadline: Deadline,
) -> Result<Fetched> {
    let started = Instant::now();
    let key = migrate::mac::configured(config.archive_key_file.as_deref())?;
    let f = migrate::fetch_archive(&migrate::FetchRequest {
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
    log::info!(
        "fetched and verified {} for {id} in {:?} (checkpoint of {}, CRIU {})",
        f.archive.display(),
        started.elapsed(),
        f.manifest.container_id,
        f.manifest.criu_version
    );
    Ok(f)
}
