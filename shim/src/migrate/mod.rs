//! Moving a container's state between nodes through a shared file system.
//!
//! Checkpoint: CRIU dumps (through runc and our CRIU front) into a local
//! staging directory -> [`stage`] adds the container's spec and writable-layer
//! changes -> [`archive`] streams everything as one tar (zstd by default)
//! with a manifest of SHA-256 digests -> [`share`] writes it to the share
//! under a temporary name and renames it into place, so a reader never sees
//! half an archive.
//!
//! Restore: [`share`] finds and opens the archive in the container's
//! tenant's part of the share -> [`unpack`] extracts
//! it into staging, refusing anything that could write outside -> [`verify`]
//! checks every member against the manifest before anything is used ->
//! [`rootfs`] applies the writable-layer changes to the new container's
//! rootfs, and runc restores from the staged images.
//!
//! The archive format is documented in `docs/archive-format.md`.

pub mod archive;
mod hash_thread;
pub mod mac;
pub mod manifest;
pub mod rootfs;
pub mod sequence;
pub mod share;
pub mod stage;
pub mod unpack;
pub mod verify;
mod xattrs;

/// Members of an archive (checkpointctl's names, so its tools can read ours).
pub mod members {
    pub const IMAGES_DIR: &str = "checkpoint";
    pub const SPEC: &str = "spec.dump";
    pub const CONFIG: &str = "config.dump";
    pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
    pub const DELETED: &str = "deleted.files";
    pub const STATS: &str = "stats-dump";
    pub const DUMP_LOG: &str = "dump.log";
    pub const MANIFEST: &str = "manifest.json";
    /// HMAC-SHA256 of the manifest under the cluster's key (signed archives).
    pub const MANIFEST_MAC: &str = "manifest.hmac-sha256";
}

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use archive::Compression;
use manifest::Manifest;
use share::{Share, Tenant};
use stage::Staging;

/// Where and how a checkpoint is published.
#[derive(Debug, Clone)]
pub struct Target {
    pub share: PathBuf,
    /// Whose part of the share; recorded in the manifest.
    pub tenant: Tenant,
    /// A key (`job`: a new timestamped archive under `job/`) or an exact
    /// archive name (`job/x.criu.tar.zst`).
    pub name: String,
    pub compression: Compression,
    pub staging_root: PathBuf,
    /// Sign the archive with this key (see [`mac`]).
    pub mac_key: Option<Vec<u8>>,
}

/// What one published checkpoint measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub archive: PathBuf,
    /// The archive's name within its tenant's part of the share.
    pub name: String,
    pub share: PathBuf,
    pub tenant: Tenant,
    pub archive_bytes: u64,
    pub images_bytes: u64,
    pub publish_time: Duration,
    pub manifest: Manifest,
}

impl Report {
    /// One line for logs and the CLI.
    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let secs = self.publish_time.as_secs_f64().max(1e-6);
        format!(
            "published {} ({:.1} MiB from {:.1} MiB of images) in {:.2} s ({:.0} MiB/s); frozen {:.0} ms, CRIU {:.0} ms",
            self.archive.display(),
            mib(self.archive_bytes),
            mib(self.images_bytes),
            secs,
            mib(self.images_bytes) / secs,
            self.manifest.stats.frozen_ms.unwrap_or(0.0),
            self.manifest.stats.criu_ms.unwrap_or(0.0),
        )
    }
}

/// What the dump left, and about which container.
pub struct Dumped<'a> {
    pub container_id: &'a str,
    pub bundle: &'a Path,
    pub rootfs_upper: Option<PathBuf>,
    pub images: &'a Path,
    pub work: &'a Path,
    pub tcp_established: bool,
    pub frozen_ms: Option<f64>,
    pub criu_ms: Option<f64>,
    pub criu_version: String,
}

/// stage -> archive -> publish, after CRIU has dumped into `d.images`.
pub fn publish_checkpoint(d: &Dumped, t: &Target) -> Result<Report> {
    let started = Instant::now();
    // The destination first: nothing is staged for a share we cannot use.
    let share = Share::open(&t.share)?
        .tenant(&t.tenant, true)?
        .ok_or_else(|| Error::Other("tenant directory not created".into()))?;
    let staging = Staging::new(&t.staging_root, &format!("publish-{}", d.container_id))?;
    let dir = staging.path();
    std::fs::copy(d.bundle.join("config.json"), dir.join(members::SPEC))
        .map_err(|e| Error::io("stage the container spec", e))?;
    let config = serde_json::json!({
        "id": d.container_id,
        "runtime": criu_shim_config::RUNTIME_ID,
        "createdTime": unix_now(),
    });
    std::fs::write(dir.join(members::CONFIG), config.to_string())
        .map_err(|e| Error::io("stage config.dump", e))?;
    if let Some(upper) = &d.rootfs_upper {
        stage::write_rootfs_diff(upper, dir)?;
    }
    let stats = [d.work.join(members::STATS), d.images.join(members::STATS)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| d.work.join(members::STATS));
    let extras = [
        (members::SPEC, dir.join(members::SPEC)),
        (members::CONFIG, dir.join(members::CONFIG)),
        (members::ROOTFS_DIFF, dir.join(members::ROOTFS_DIFF)),
        (members::DELETED, dir.join(members::DELETED)),
        (members::STATS, stats),
        (members::DUMP_LOG, d.work.join("dump.log")),
    ];
    let sources = archive::sources(d.images, &extras)?;
    let pages_bytes = sources
        .iter()
        .filter(|s| s.name.starts_with("checkpoint/pages-"))
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    let base = Manifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        container_id: d.container_id.to_string(),
        tenant: Some(t.tenant.id()),
        created: unix_now(),
        criu_version: d.criu_version.clone(),
        kernel: manifest::kernel_release(),
        shim_version: env!("CARGO_PKG_VERSION").into(),
        compression: t.compression.name().into(),
        tcp_established: d.tcp_established,
        stats: manifest::Stats {
            frozen_ms: d.frozen_ms,
            criu_ms: d.criu_ms,
            pages_bytes,
        },
        members: Vec::new(),
    };
    let name = if share::is_archive_name(&t.name) {
        t.name.clone()
    } else {
        share::new_name(&t.name, t.compression != Compression::None)
    };
    let mut result = None;
    let published = share.publish(&name, |w| {
        result = Some(archive::write(
            w,
            &sources,
            base,
            t.compression,
            t.mac_key.as_deref(),
        )?);
        Ok(())
    })?;
    let Some((manifest, _)) = result else {
        return Err(Error::Other("the archive writer did not run".into()));
    };
    drop(staging);
    Ok(Report {
        archive: published.path,
        name: published.name,
        share: t.share.clone(),
        tenant: t.tenant.clone(),
        archive_bytes: published.size,
        // Every archived file's size is in the manifest already.
        images_bytes: manifest.total_size(),
        publish_time: started.elapsed(),
        manifest,
    })
}

/// Takes a published archive back (a pod checkpoint that failed half-way):
/// the archive and its sequence marker.
pub fn unpublish(r: &Report) {
    match Share::open(&r.share).and_then(|s| s.tenant(&r.tenant, false)) {
        Ok(Some(share)) => share.unpublish(&r.name),
        Ok(None) => {}
        Err(e) => log::warn!("take back {}: {e}", r.archive.display()),
    }
}

/// An archive fetched, unpacked and verified into staging.
pub struct Fetched {
    pub staging: Staging,
    pub manifest: Manifest,
    pub archive: PathBuf,
}

impl Fetched {
    pub fn images(&self) -> PathBuf {
        self.staging.images()
    }
}

/// What to fetch, for whom, and how.
pub struct FetchRequest<'a> {
    pub share: &'a Path,
    /// The restoring container's tenant: the key resolves in its part of
    /// the share, and the archive must have been made for it.
    pub tenant: &'a Tenant,
    pub reference: &'a str,
    pub staging_root: &'a Path,
    /// The restoring container's id (names its staging).
    pub id: &'a str,
    pub wait: Duration,
    pub mac_key: Option<&'a [u8]>,
    /// Operator setting: accept archives made for another tenant.
    pub cross_tenant: bool,
}

/// fetch -> unpack -> verify. On error nothing is left in staging.
pub fn fetch_archive(r: &FetchRequest) -> Result<Fetched> {
    let share = Share::open(r.share)?
        .tenant(r.tenant, false)?
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no archive under {}/ on the share {}: nothing was ever checkpointed for {}",
                r.reference,
                r.share.display(),
                r.tenant
            ))
        })?;
    let archive = share.resolve_waiting(r.reference, r.wait)?;
    let (file, _size) = archive.open()?;
    let path = archive.path();
    let staging = Staging::new(r.staging_root, &format!("restore-{}", r.id))?;
    let what = path.display().to_string();
    let unpacked = unpack::unpack(file, staging.path(), unpack::Limits::default(), &what)?;
    let manifest = verify::verify(&unpacked, &what, r.mac_key)?;
    check_tenant(&manifest, r.tenant, r.cross_tenant, &what)?;
    Ok(Fetched {
        staging,
        manifest,
        archive: path,
    })
}

/// An archive belongs to the tenant it was made for (recorded in the
/// manifest, which the cluster key signs).
fn check_tenant(m: &Manifest, tenant: &Tenant, cross_tenant: bool, what: &str) -> Result<()> {
    let id = tenant.id();
    if cross_tenant || m.tenant.as_deref() == Some(id.as_str()) {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "archive {what} was made for {}, not for {tenant}; restores across tenants are refused \
         unless the operator sets {}=true",
        m.tenant
            .as_deref()
            .unwrap_or("no tenant (an older archive)"),
        criu_shim_config::env::ALLOW_CROSS_TENANT
    )))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake dump: a bundle with a spec, CRIU-like images, a work dir.
    fn fake_dump(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let bundle = dir.join("bundle");
        let images = dir.join("images");
        let work = dir.join("work");
        for d in [&bundle, &images, &work] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(bundle.join("config.json"), br#"{"ociVersion":"1.0.2"}"#).unwrap();
        std::fs::write(images.join("inventory.img"), b"inventory").unwrap();
        std::fs::write(images.join("pages-1.img"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(work.join("dump.log"), b"(00.1) dump ok").unwrap();
        (bundle, images, work)
    }

    /// fetch_archive for the containerd tenant, as most tests want.
    fn fetch(
        share: &Path,
        reference: &str,
        staging_root: &Path,
        mac_key: Option<&[u8]>,
    ) -> Result<Fetched> {
        fetch_archive(&FetchRequest {
            share,
            tenant: &Tenant::Containerd,
            reference,
            staging_root,
            id: "c2",
            wait: Duration::ZERO,
            mac_key,
            cross_tenant: false,
        })
    }

    /// Where the containerd tenant's key `key` lives on `share`.
    fn key_dir(share: &Path, key: &str) -> PathBuf {
        share.join(Tenant::Containerd.dir_name()).join(key)
    }

    fn publish_one(dir: &Path, share: &Path, compression: Compression) -> Report {
        publish_signed(dir, share, compression, None)
    }

    fn publish_signed(
        dir: &Path,
        share: &Path,
        compression: Compression,
        mac_key: Option<&[u8]>,
    ) -> Report {
        let (bundle, images, work) = fake_dump(dir);
        let d = Dumped {
            container_id: "c1",
            bundle: &bundle,
            rootfs_upper: None,
            images: &images,
            work: &work,
            tcp_established: false,
            frozen_ms: Some(12.0),
            criu_ms: Some(34.0),
            criu_version: "4.2.1".into(),
        };
        let t = Target {
            share: share.to_path_buf(),
            tenant: Tenant::Containerd,
            name: "job".into(),
            compression,
            staging_root: dir.join("staging"),
            mac_key: mac_key.map(<[u8]>::to_vec),
        };
        publish_checkpoint(&d, &t).unwrap()
    }

    #[test]
    fn an_archive_round_trips_and_staging_is_cleaned() {
        for compression in [
            Compression::Zstd {
                level: 1,
                workers: 2,
            },
            Compression::None,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let share = tempfile::tempdir().unwrap();
            let report = publish_one(dir.path(), share.path(), compression);
            assert!(report.archive.starts_with(key_dir(share.path(), "job")));
            assert!(std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .next()
                .is_none());
            let f = fetch(share.path(), "job", &dir.path().join("rst"), None).unwrap();
            assert_eq!(f.manifest.tenant.as_deref(), Some("containerd"));
            assert_eq!(f.manifest.container_id, "c1");
            assert_eq!(f.manifest.stats.pages_bytes, 3 << 20);
            assert_eq!(
                std::fs::read(f.images().join("pages-1.img")).unwrap(),
                vec![7u8; 3 << 20]
            );
            assert!(f.staging.path().join(members::SPEC).is_file());
            let staged = f.staging.path().to_path_buf();
            drop(f);
            assert!(!staged.exists(), "restore staging not removed");
        }
    }

    #[test]
    fn corrupt_and_truncated_archives_are_refused_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let report = publish_one(
            dir.path(),
            share.path(),
            Compression::Zstd {
                level: 1,
                workers: 1,
            },
        );
        let bytes = std::fs::read(&report.archive).unwrap();
        let flip = |at: usize| {
            let mut b = bytes.clone();
            b[at] ^= 0x55;
            b
        };
        let n = bytes.len();
        // A flipped byte anywhere: in data, in tar padding after the end
        // marker (only the zstd frame checksum covers it), in the checksum.
        let cases: [(&str, Vec<u8>); 7] = [
            ("flip-quarter", flip(n / 4)),
            ("flip-half", flip(n / 2)),
            ("flip-3-quarters", flip(n * 3 / 4)),
            ("flip-near-end", flip(n - 6)),
            ("flip-last", flip(n - 1)),
            ("truncated", bytes[..n * 2 / 3].to_vec()),
            ("empty", Vec::new()),
        ];
        for (name, data) in cases {
            std::fs::create_dir_all(key_dir(share.path(), name)).unwrap();
            std::fs::write(key_dir(share.path(), name).join("x.criu.tar.zst"), data).unwrap();
            let staging = dir.path().join(format!("rst-{name}"));
            let err = fetch(share.path(), name, &staging, None)
                .err()
                .unwrap_or_else(|| panic!("{name} accepted"));
            assert!(matches!(err, Error::InvalidArgument(_)), "{name}: {err}");
            assert!(
                std::fs::read_dir(&staging).unwrap().next().is_none(),
                "{name}: staging left"
            );
        }
    }

    #[test]
    fn with_a_cluster_key_only_archives_it_signed_are_restored() {
        let key = [1u8; 32];
        let other = [2u8; 32];
        let zstd = Compression::Zstd {
            level: 1,
            workers: 2,
        };
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let fetch = |reference: &str, k: Option<&[u8]>, staging: &str| {
            fetch(share.path(), reference, &dir.path().join(staging), k)
        };
        let signed = publish_signed(dir.path(), share.path(), zstd, Some(&key));
        let name = signed.name.as_str();
        assert!(fetch(name, Some(&key), "ok").is_ok());
        // A node without a key reads signed archives too.
        assert!(fetch(name, None, "nokey").is_ok());
        let err = fetch(name, Some(&other), "other").err().expect("other key");
        assert!(err.to_string().contains("does not verify"), "{err}");

        // Unsigned, or forged: valid digests, but no MAC under our key.
        std::fs::remove_dir_all(key_dir(share.path(), "job")).unwrap();
        let unsigned = publish_signed(dir.path(), share.path(), zstd, None);
        let err = fetch(&unsigned.name, Some(&key), "unsigned")
            .err()
            .expect("unsigned archive accepted");
        assert!(err.to_string().contains("not signed"), "{err}");
        std::fs::remove_dir_all(key_dir(share.path(), "job")).unwrap();
        let forged = publish_signed(dir.path(), share.path(), zstd, Some(&other));
        assert!(fetch(&forged.name, Some(&key), "forged").is_err());
        for staging in ["other", "unsigned", "forged"] {
            let left = std::fs::read_dir(dir.path().join(staging))
                .map(|d| d.count())
                .unwrap_or(0);
            assert_eq!(left, 0, "{staging}: staging left");
        }
    }

    #[test]
    fn an_archive_belongs_to_its_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let report = publish_one(dir.path(), share.path(), Compression::None);
        let team_a = Tenant::namespace("team-a").unwrap();
        // Another tenant does not even see the key...
        let request = |tenant: &Tenant, reference: &str, cross_tenant: bool| {
            fetch_archive(&FetchRequest {
                share: share.path(),
                tenant,
                reference,
                staging_root: &dir.path().join("rst"),
                id: "c",
                wait: Duration::ZERO,
                mac_key: None,
                cross_tenant,
            })
        };
        let err = request(&team_a, "job", false).err().unwrap();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        // ...and an archive copied into its part is refused by its manifest
        // unless the operator allows it.
        let theirs = key_dir(share.path(), "job");
        let ours = share.path().join(team_a.dir_name()).join("job");
        std::fs::create_dir_all(&ours).unwrap();
        let file = report.archive.file_name().unwrap();
        std::fs::copy(theirs.join(file), ours.join(file)).unwrap();
        let err = request(&team_a, "job", false).err().unwrap().to_string();
        assert!(
            err.contains("made for containerd") && err.contains("CRIU_SHIM_ALLOW_CROSS_TENANT"),
            "{err}"
        );
        assert!(request(&team_a, "job", true).is_ok());
    }
}
