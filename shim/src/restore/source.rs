//! What a Create restores from, and who may ask for what.
//!
//! containerd's checkpoint path (`CreateTaskRequest.checkpoint`) comes from
//! containerd itself. Our annotation comes from whoever wrote the pod, so
//! it names an archive on the share and nothing else. A directory of
//! images on the node is an operator's tool: allowed only beneath the
//! directory the operator named in `CRIU_SHIM_LOCAL_IMAGES_DIR`, resolved
//! without following symlinks.

use std::path::{Component, Path, PathBuf};

use containerd_shim::api;
use criu_shim_config::{env, ShimConfig, ANNOTATION_RESTORE_FROM};

use crate::error::{Error, Result};
use crate::migrate;
use crate::spec::Spec;

pub enum Source {
    /// A directory of CRIU images on this node.
    Images(PathBuf),
    /// An archive (or a key naming the newest one) on the share.
    Archive(String),
}

/// The source of this Create, if it is a restore.
pub fn of(
    req: &api::CreateTaskRequest,
    spec: &Spec,
    config: &ShimConfig,
) -> Result<Option<Source>> {
    if !req.checkpoint.is_empty() {
        return Ok(Some(Source::Images(PathBuf::from(&req.checkpoint))));
    }
    match spec.restore_from() {
        None => Ok(None),
        Some(from) if from.starts_with('/') => {
            local_images(Path::new(from), config.local_images_dir.as_deref()).map(Some)
        }
        Some(reference) => Ok(Some(Source::Archive(migrate::share::per_container(
            reference,
            spec.container_name(),
        )))),
    }
}

/// An absolute `restore-from`: only beneath the operator's directory.
fn local_images(path: &Path, allowed_dir: Option<&Path>) -> Result<Source> {
    let Some(dir) = allowed_dir else {
        return Err(Error::InvalidArgument(format!(
            "{ANNOTATION_RESTORE_FROM}={}: restoring from a directory on the node is not \
             allowed; name an archive on the share (a key such as `my-job`). Operators can \
             allow a directory with {}",
            path.display(),
            env::LOCAL_IMAGES_DIR
        )));
    };
    let rel = path
        .strip_prefix(dir)
        .ok()
        .filter(|r| {
            r.components().next().is_some()
                && r.components().all(|c| matches!(c, Component::Normal(_)))
        })
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{ANNOTATION_RESTORE_FROM}={}: not beneath {} ({}); name an archive on the share",
                path.display(),
                dir.display(),
                env::LOCAL_IMAGES_DIR
            ))
        })?;
    let root = crate::beneath::open_root(dir).map_err(|e| {
        Error::io(
            format!("open {} ({})", dir.display(), env::LOCAL_IMAGES_DIR),
            e,
        )
    })?;
    let images =
        crate::beneath::open(&root, rel, libc::O_DIRECTORY | libc::O_RDONLY, 0).map_err(|e| {
            if crate::beneath::is_escape(&e) {
                Error::InvalidArgument(format!(
                    "{ANNOTATION_RESTORE_FROM}={}: a symlink is on the way; refused",
                    path.display()
                ))
            } else {
                Error::io(format!("open images {}", path.display()), e)
            }
        })?;
    crate::beneath::open(&images, Path::new("inventory.img"), libc::O_RDONLY, 0).map_err(|_| {
        Error::InvalidArgument(format!(
            "{ANNOTATION_RESTORE_FROM}={}: no CRIU images there (inventory.img missing)",
            path.display()
        ))
    })?;
    Ok(Source::Images(path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_directories_need_the_operator_s_setting() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("ok");
        std::fs::create_dir(&images).unwrap();
        std::fs::write(images.join("inventory.img"), b"x").unwrap();
        let err = local_images(&images, None).err().unwrap().to_string();
        assert!(
            err.contains("not allowed") && err.contains(env::LOCAL_IMAGES_DIR),
            "{err}"
        );
        assert!(local_images(&images, Some(dir.path())).is_ok());

        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("link")).unwrap();
        std::fs::write(elsewhere.path().join("inventory.img"), b"x").unwrap();
        let err = local_images(&dir.path().join("link"), Some(dir.path()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("symlink"), "{err}");
        for bad in ["/etc", "/"] {
            assert!(
                local_images(Path::new(bad), Some(dir.path())).is_err(),
                "{bad}"
            );
        }
        let up = dir.path().join("ok/../../etc");
        assert!(local_images(&up, Some(dir.path())).is_err());
    }
}
