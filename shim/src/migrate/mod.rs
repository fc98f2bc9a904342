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
pub mod config_dump;
pub mod follow;
pub mod frames;
mod hash_thread;
pub mod mac;
pub mod manifest;
pub mod parts;
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

    /// `N` of a member holding one of CRIU's page images
    /// (`checkpoint/pages-N.img`): the one test of "is memory" that the
    /// writer (what it punches out and counts) and the restore (what it
    /// leaves to userfaultfd) share.
    pub fn page_image_id(member: &str) -> Option<u32> {
        member
            .strip_prefix(IMAGES_DIR)?
            .strip_prefix("/pages-")?
            .strip_suffix(".img")?
            .parse()
            .ok()
    }
}

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use archive::Compression;
use follow::{DumpEnd, Follow};
use frames::FrameStats;
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
    /// Counts the bytes archived so far, for progress reports.
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Told once everything of the container's state is taken (the dump
    /// has ended and its writable layer's changes are staged): it may run
    /// on while the rest is archived.
    pub state_taken: Option<std::sync::mpsc::SyncSender<()>>,
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
    /// How many 1 MiB chunks went out stored and compressed.
    pub chunks: FrameStats,
    /// When, after the start, each step of the publish ended.
    pub steps: Steps,
    pub manifest: Manifest,
}

/// When the steps of a publish ended, from its start: where a slow one
/// spends its time (CRIU, the archive's tail, or making it durable).
#[derive(Debug, Clone, Copy, Default)]
pub struct Steps {
    /// CRIU's dump had ended and every page image it wrote was in the
    /// archive (publishes that follow the dump).
    pub dump_ended: Option<Duration>,
    /// The last byte of the archive was handed to the share.
    pub written: Duration,
    /// fsync, rename and the directory's fsync done.
    pub durable: Duration,
}

impl Report {
    /// One line for logs and the CLI.
    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let secs = self.publish_time.as_secs_f64().max(1e-6);
        format!(
            "published {} ({:.1} MiB from {:.1} MiB of images; {} of {} chunks compressed, {} found the share behind; share {:.2} ms/MiB, compressor {:.2} ms/MiB at {:.1}:1) in {:.2} s ({:.0} MiB/s: pages archived and dump ended at {}, archive written at {:.2} s, durable at {:.2} s); frozen {:.0} ms, CRIU {:.0} ms",
            self.archive.display(),
            mib(self.archive_bytes),
            mib(self.images_bytes),
            self.chunks.compressed,
            self.chunks.compressed + self.chunks.stored,
            self.chunks.backlogged,
            self.chunks.write_us_per_mib as f64 / 1000.0,
            self.chunks.compress_us_per_mib as f64 / 1000.0,
            self.chunks.ratio_milli as f64 / 1000.0,
            secs,
            mib(self.images_bytes) / secs,
            self.steps
                .dump_ended
                .map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
            self.steps.written.as_secs_f64(),
            self.steps.durable.as_secs_f64(),
            self.manifest.stats.frozen_ms.unwrap_or(0.0),
            self.manifest.stats.criu_ms.unwrap_or(0.0),
        )
    }
}

/// What the dump left, and about which container.
pub struct Dumped<'a> {
    pub container_id: &'a str,
    /// The container's name (in its pod) and image, for config.dump.
    pub name: Option<&'a str>,
    pub image: Option<&'a str>,
    pub bundle: &'a Path,
    pub rootfs_upper: Option<PathBuf>,
    pub images: &'a Path,
    /// `images` is our own staging (not a directory containerd reads
    /// afterwards): archived page images may be punched out as they go.
    pub images_are_staging: bool,
    pub work: &'a Path,
    pub tcp_established: bool,
    pub frozen_ms: Option<f64>,
    pub criu_ms: Option<f64>,
    pub criu_version: String,
    /// Post-copy: the memory stays with the source's relay, named here.
    pub page_source: Option<manifest::PageSourceRef>,
}

/// stage -> archive -> publish, after CRIU has dumped into `d.images`.
pub fn publish_checkpoint(d: &Dumped, t: &Target) -> Result<Report> {
    publish(d, t, None)
}

/// The same while CRIU dumps into `d.images`: the page images go into the
/// archive as CRIU writes them, everything else once the dump has ended
/// (which `follow` reports, with the dump's times). A failed dump fails
/// the publish and leaves nothing on the share.
pub fn publish_while_dumping(d: &Dumped, t: &Target, follow: Follow) -> Result<Report> {
    publish(d, t, Some(follow))
}

fn publish(d: &Dumped, t: &Target, follow: Option<Follow>) -> Result<Report> {
    let started = Instant::now();
    // The destination first: nothing is staged for a share we cannot use.
    let share = Share::open(&t.share)?
        .tenant(&t.tenant, true)?
        .ok_or_else(|| Error::Other("tenant directory not created".into()))?;
    let staging = Staging::new(&t.staging_root, &format!("publish-{}", d.container_id))?;
    stage_container_files(d, staging.path())?;
    let exact = share::is_archive_name(&t.name);
    let name = if exact {
        t.name.clone()
    } else {
        share::new_name(&t.name, t.compression != Compression::None)
    };
    let mut result = None;
    let mut steps = Steps::default();
    let published = share.publish(&name, !exact, |file| {
        result = Some(archive::write(
            file,
            t.compression,
            t.mac_key.as_deref(),
            t.progress.as_deref(),
            |w| {
                let m = write_members(w, d, t, staging.path(), follow, started);
                steps.dump_ended = m.as_ref().ok().and_then(|m| m.1);
                m.map(|m| m.0)
            },
        )?);
        steps.written = started.elapsed();
        Ok(())
    })?;
    steps.durable = started.elapsed();
    let Some((manifest, _, chunks)) = result else {
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
        chunks,
        steps,
        manifest,
    })
}

/// The container's spec and config.dump (checkpointctl's), known before
/// the dump ends.
fn stage_container_files(d: &Dumped, dir: &Path) -> Result<()> {
    let spec = std::fs::read(d.bundle.join("config.json"))
        .map_err(|e| Error::io("stage the container spec", e))?;
    stage::write_private(&dir.join(members::SPEC), &spec)?;
    let created = std::fs::metadata(d.bundle.join("config.json"))
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| std::time::SystemTime::now());
    let config = config_dump::ContainerConfig {
        id: d.container_id.to_string(),
        name: d.name.unwrap_or(d.container_id).to_string(),
        rootfs_image_name: d.image.map(str::to_string),
        rootfs_image_ref: None,
        runtime: criu_shim_config::RUNTIME_ID.into(),
        created_time: config_dump::rfc3339(created),
        checkpointed_time: config_dump::rfc3339(std::time::SystemTime::now()),
    };
    let config =
        serde_json::to_vec(&config).map_err(|e| Error::Other(format!("config.dump: {e}")))?;
    stage::write_private(&dir.join(members::CONFIG), &config)
}

/// Every member, in order: the page images CRIU is writing (when
/// following), then, once the dump has ended, the writable layer's
/// changes and everything not yet archived. Returns the manifest and,
/// when following, when (after `started`) the dump ended.
fn write_members(
    w: &mut archive::Writer,
    d: &Dumped,
    t: &Target,
    dir: &Path,
    follow: Option<Follow>,
    started: Instant,
) -> Result<(Manifest, Option<Duration>)> {
    let mut dump_ended = None;
    w.consume(d.images_are_staging);
    let (mut frozen_ms, mut criu_ms) = (d.frozen_ms, d.criu_ms);
    let mut criu_version = d.criu_version.clone();
    let mut followed = std::collections::HashSet::new();
    if let Some(mut f) = follow {
        while let Some((name, file)) = f.next_image()? {
            let member = format!("{}/{name}", members::IMAGES_DIR);
            w.append_growing(&member, file, &mut f)?;
        }
        followed = f.followed().clone();
        let end = f.end();
        dump_ended = Some(started.elapsed());
        match end {
            DumpEnd::Done {
                frozen_ms: fr,
                criu_ms: cr,
                criu_version: v,
            } => (frozen_ms, criu_ms, criu_version) = (fr, cr, v),
            DumpEnd::Failed(e) => return Err(Error::Other(format!("the dump failed: {e}"))),
        }
    }
    if let Some(upper) = &d.rootfs_upper {
        stage::write_rootfs_diff(upper, dir)?;
    }
    if let Some(taken) = &t.state_taken {
        let _ = taken.send(());
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
    for s in archive::sources(d.images, &extras)? {
        let image = s
            .name
            .strip_prefix(members::IMAGES_DIR)
            .and_then(|n| n.strip_prefix('/'));
        if !image.is_some_and(|n| followed.contains(n)) {
            w.append(&s)?;
        }
    }
    let pages_bytes = w
        .members()
        .iter()
        .filter(|m| members::page_image_id(&m.path).is_some())
        .map(|m| m.size)
        .sum();
    Ok((
        Manifest {
            format: manifest::FORMAT.into(),
            version: match d.page_source {
                Some(_) => manifest::VERSION_POST_COPY,
                None => manifest::VERSION,
            },
            container_id: d.container_id.to_string(),
            tenant: Some(t.tenant.id()),
            created: w.mtime(),
            criu_version,
            kernel: manifest::kernel_release(),
            shim_version: env!("CARGO_PKG_VERSION").into(),
            compression: t.compression.name().into(),
            tcp_established: d.tcp_established,
            stats: manifest::Stats {
                frozen_ms,
                criu_ms,
                pages_bytes,
            },
            members: Vec::new(),
            frames: Vec::new(),
            page_source: d.page_source.clone(),
        },
        dump_ended,
    ))
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
    pub limits: unpack::Limits,
    /// Stop when containerd has given up on the Create.
    pub deadline: unpack::Deadline,
}

/// fetch -> unpack -> verify. On error nothing is left in staging.
#[cfg(test)]
pub fn fetch_archive(r: &FetchRequest) -> Result<Fetched> {
    open_archive(r)?.fetch_all()
}

/// An archive on the share whose manifest is authenticated (and made for
/// the restoring tenant), with fresh staging; nothing extracted yet.
pub struct Opened {
    file: std::fs::File,
    len: u64,
    expected: verify::Expected,
    pub archive: PathBuf,
    what: String,
    pub staging: Staging,
    /// Stop when containerd has given up on the Create.
    pub deadline: unpack::Deadline,
}

/// Steps 1-2 of [`unpack`] for an archive the request names.
pub fn open_archive(r: &FetchRequest) -> Result<Opened> {
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
    let (mut file, len) = archive.open()?;
    let path = archive.path();
    let what = path.display().to_string();
    let trailer = unpack::read_trailer(&mut file, &what, &r.limits)?;
    let expected = verify::authenticate(&trailer, &what, r.mac_key, &r.limits)?;
    check_tenant(&expected.manifest, r.tenant, r.cross_tenant, &what)?;
    let staging = Staging::new(r.staging_root, &format!("restore-{}", r.id))?;
    Ok(Opened {
        file,
        len,
        expected,
        archive: path,
        what,
        staging,
        deadline: r.deadline,
    })
}

impl Opened {
    pub fn manifest(&self) -> &Manifest {
        &self.expected.manifest
    }

    /// The whole archive into staging, every member verified.
    pub fn fetch_all(self) -> Result<Fetched> {
        unpack::unpack_authenticated(
            self.file,
            self.staging.path(),
            &self.expected,
            &self.what,
            self.deadline,
        )?;
        Ok(Fetched {
            staging: self.staging,
            manifest: self.expected.manifest,
            archive: self.archive,
        })
    }

    /// A reader of verified parts; None if the archive can only be read
    /// whole (no frame table).
    pub fn parts(&self) -> Result<Option<parts::Parts>> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io(format!("reopen {}", self.what), e))?;
        parts::Parts::new(file, self.len, self.manifest(), &self.what)
    }

    /// Staging holds what was extracted into it by parts.
    pub fn into_fetched(self) -> Fetched {
        Fetched {
            staging: self.staging,
            manifest: self.expected.manifest,
            archive: self.archive,
        }
    }
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
            limits: Default::default(),
            deadline: Default::default(),
        })
    }

    /// Key `job` of the containerd tenant on `share`, staged under `staging`.
    fn request<'a>(share: &'a Path, staging: &'a Path) -> FetchRequest<'a> {
        FetchRequest {
            share,
            tenant: &Tenant::Containerd,
            reference: "job",
            staging_root: staging,
            id: "c2",
            wait: Duration::ZERO,
            mac_key: None,
            cross_tenant: false,
            limits: Default::default(),
            deadline: Default::default(),
        }
    }

    /// Member `path` of an opened archive's manifest.
    fn member(o: &Opened, path: &str) -> manifest::Member {
        o.manifest()
            .members
            .iter()
            .find(|m| m.path == path)
            .unwrap_or_else(|| panic!("no {path}"))
            .clone()
    }

    /// Where the containerd tenant's key `key` lives on `share`.
    fn key_dir(share: &Path, key: &str) -> PathBuf {
        share.join(Tenant::Containerd.dir_name()).join(key)
    }

    /// A dump's description for the fake dump's three directories.
    fn dumped<'a>(bundle: &'a Path, images: &'a Path, work: &'a Path) -> Dumped<'a> {
        Dumped {
            container_id: "c1",
            name: None,
            image: None,
            bundle,
            rootfs_upper: None,
            images,
            images_are_staging: false,
            work,
            tcp_established: false,
            frozen_ms: None,
            criu_ms: None,
            criu_version: "4.2.1".into(),
            page_source: None,
        }
    }

    /// Key `job` of the containerd tenant on `share`, unsigned.
    fn target(share: &Path, staging_root: PathBuf, compression: Compression) -> Target {
        Target {
            share: share.to_path_buf(),
            tenant: Tenant::Containerd,
            name: "job".into(),
            compression,
            staging_root,
            mac_key: None,
            progress: None,
            state_taken: None,
        }
    }

    /// A fake dump published with the default compression (frames), in
    /// fresh directories: (work dir, share, report).
    fn published_adaptive() -> (tempfile::TempDir, tempfile::TempDir, Report) {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let adaptive = Compression::Adaptive {
            level: 1,
            workers: 2,
        };
        let report = publish_one(dir.path(), share.path(), adaptive);
        (dir, share, report)
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
            frozen_ms: Some(12.0),
            criu_ms: Some(34.0),
            ..dumped(&bundle, &images, &work)
        };
        let t = Target {
            mac_key: mac_key.map(<[u8]>::to_vec),
            ..target(share, dir.join("staging"), compression)
        };
        publish_checkpoint(&d, &t).unwrap()
    }

    /// What a lazy restore reads by parts is what a whole fetch unpacks,
    /// and a modified frame is refused where it is read, nowhere else.
    #[test]
    fn parts_of_an_archive_are_read_and_verified_on_their_own() {
        let (dir, share, report) = published_adaptive();
        assert!(!report.manifest.frames.is_empty(), "no frame table");
        let share_path = share.path().to_path_buf();
        let whole_root = dir.path().join("whole");
        let whole = open_archive(&request(&share_path, &whole_root))
            .unwrap()
            .fetch_all()
            .unwrap();
        let parts_root = dir.path().join("parts");
        let opened = open_archive(&request(&share_path, &parts_root)).unwrap();
        let mut parts = opened.parts().unwrap().expect("a frame table");
        for m in &opened.manifest().members {
            parts::extract_member(&mut parts, m, opened.staging.path()).unwrap();
            let a = std::fs::read(whole.staging.path().join(&m.path)).unwrap();
            let b = std::fs::read(opened.staging.path().join(&m.path)).unwrap();
            assert!(a == b, "{} differs", m.path);
        }
        let pages = member(&opened, "checkpoint/pages-1.img");
        // Damage one byte in the middle of the page image's frames.
        let archive = report.archive.clone();
        let mut bytes = std::fs::read(&archive).unwrap();
        let frame = opened
            .manifest()
            .frames
            .iter()
            .find(|f| f.1 > 100_000)
            .unwrap()
            .clone();
        bytes[(frame.0 + frame.1 / 2) as usize] ^= 1;
        std::fs::write(&archive, &bytes).unwrap();
        let opened = open_archive(&request(&share_path, &dir.path().join("again"))).unwrap();
        let mut parts = opened.parts().unwrap().unwrap();
        let err = parts::extract_member(&mut parts, &pages, opened.staging.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match its digest"), "{err}");
        let spec = member(&opened, members::SPEC);
        parts::extract_member(&mut parts, &spec, opened.staging.path()).unwrap();
    }

    /// Format 3: the frame table is the only digest of the members, and the
    /// whole-archive reader (staged restores, `verify`) holds every frame
    /// to it before decompressing, as the reader of parts does.
    #[test]
    fn a_format_3_archive_is_verified_by_its_frames_when_read_whole() {
        let (dir, share, report) = published_adaptive();
        let m = &report.manifest;
        assert_eq!(m.version, 3);
        assert!(m.members.iter().all(|x| x.sha256.is_none()), "hashed twice");
        let whole = fetch(share.path(), "job", &dir.path().join("ok"), None).unwrap();
        assert_eq!(
            std::fs::read(whole.images().join("pages-1.img")).unwrap(),
            vec![7u8; 3 << 20]
        );
        let frame = m.frames.iter().find(|f| f.1 > 100_000).unwrap().clone();
        let mut bytes = std::fs::read(&report.archive).unwrap();
        bytes[(frame.0 + frame.1 / 2) as usize] ^= 1;
        std::fs::write(&report.archive, &bytes).unwrap();
        let err = refusal(share.path(), "job", &dir.path().join("bad"));
        assert!(err.contains("does not match its digest"), "{err}");
    }

    /// A member without a digest of its own must lie inside the frame
    /// table: an archive whose (authentic) table stops short of a member's
    /// bytes is refused, not read unverified.
    #[test]
    fn an_undigested_member_outside_the_frame_table_is_refused() {
        let (dir, share, report) = published_adaptive();
        let bytes = std::fs::read(&report.archive).unwrap();
        let end = bytes.len();
        let at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(x) as usize
        };
        // The members' frames, kept; a new manifest whose table holds only
        // the first frame (the directory entry and the first header).
        let members_end = at(end - 8);
        let mut m = report.manifest.clone();
        m.frames.truncate(1);
        let json = serde_json::to_vec(&m).unwrap();
        let mut trailer = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(json.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        trailer
            .append_data(&mut h, members::MANIFEST, json.as_slice())
            .unwrap();
        let trailer = trailer.into_inner().unwrap();
        let mut forged = bytes[..members_end].to_vec();
        forged.extend(zstd::encode_all(trailer.as_slice(), 1).unwrap());
        forged.extend(archive::INDEX_MAGIC.to_le_bytes());
        forged.extend(16u32.to_le_bytes());
        forged.extend(archive::INDEX_TAG);
        forged.extend((members_end as u64).to_le_bytes());
        plant(share.path(), "short", &forged);
        let err = refusal(share.path(), "short", &dir.path().join("short"));
        assert!(err.contains("outside the frame table"), "{err}");
    }

    /// Frame digests are SHA-256 in format 2 (archives of the previous
    /// shim, still read) and BLAKE3 from format 3; one is never taken for
    /// the other.
    #[test]
    fn frame_digests_follow_the_archive_s_version() {
        let bytes = b"a frame's bytes".to_vec();
        let sha = archive::sha256_hex(&bytes);
        let b3 = archive::hex(blake3::hash(&bytes).as_bytes());
        for (version, digest, ok) in [
            (2, &sha, true),
            (3, &b3, true),
            (2, &b3, false),
            (3, &sha, false),
        ] {
            let mut m = manifest_of(&[]);
            m.version = version;
            m.frames = vec![manifest::FrameRef(0, bytes.len() as u64, 1, digest.clone())];
            let table = parts::FrameTable::parse(&m, bytes.len() as u64, "x")
                .unwrap()
                .unwrap();
            assert_eq!(table.verify(0, &bytes).is_ok(), ok, "version {version}");
        }
    }

    /// Reads through the read-ahead helper give what direct reads give, in
    /// any order, and never wait for a frame that was fetched.
    #[test]
    fn reading_ahead_gives_the_same_bytes_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let (bundle, images, work) = fake_dump(dir.path());
        let big: Vec<u8> = (0..(40u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(images.join("pages-1.img"), &big).unwrap();
        let adaptive = Compression::Adaptive {
            level: 1,
            workers: 2,
        };
        let t = target(share.path(), dir.path().join("staging"), adaptive);
        publish_checkpoint(&dumped(&bundle, &images, &work), &t).unwrap();
        let staging = dir.path().join("r");
        let opened = open_archive(&request(share.path(), &staging)).unwrap();
        let m = member(&opened, "checkpoint/pages-1.img");
        let mut direct = opened.parts().unwrap().unwrap();
        let mut ahead = opened.parts().unwrap().unwrap();
        ahead.read_ahead(Duration::from_secs(5));
        let base = m.offset.unwrap();
        let mut x: u64 = 12345;
        for step in 0..3000u64 {
            // Runs forward with jumps back and forth, as faults and the
            // background copy ask.
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = if step % 3 == 0 {
                (x >> 20) % (m.size - 200_000)
            } else {
                (step * 131_072) % (m.size - 200_000)
            };
            let len = 1 + ((x >> 40) % 150_000) as usize;
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            direct.read(base + at, &mut a).unwrap();
            ahead.read(base + at, &mut b).unwrap();
            assert!(a == b, "bytes differ at {at}+{len}");
            assert!(
                a == big[at as usize..at as usize + len],
                "wrong bytes at {at}"
            );
        }
    }

    /// The dump writes its page images in pieces while the archive is
    /// written; what is published is what CRIU wrote, complete, and the
    /// staged copies are punched out as they are archived.
    #[test]
    fn an_archive_written_while_the_dump_runs_holds_the_complete_images() {
        for compression in [
            Compression::Adaptive {
                level: 1,
                workers: 2,
            },
            Compression::None,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let share = tempfile::tempdir().unwrap();
            let (bundle, images, work) = fake_dump(dir.path());
            std::fs::remove_file(images.join("pages-1.img")).unwrap();
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let follow = Follow::new(&images, rx, true).unwrap();
            let criu_images = images.clone();
            let criu = std::thread::spawn(move || {
                use std::io::Write;
                let mut want = Vec::new();
                for n in 1..=2 {
                    let path = criu_images.join(format!("pages-{n}.img"));
                    let mut f = std::fs::File::create(path).unwrap();
                    for i in 0..6u32 {
                        let part: Vec<u8> = (0..700_000u32).map(|j| (j * n + i) as u8).collect();
                        f.write_all(&part).unwrap();
                        want.push(part);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                std::fs::write(criu_images.join("core-1.img"), b"core").unwrap();
                tx.send(DumpEnd::Done {
                    frozen_ms: Some(5.0),
                    criu_ms: Some(6.0),
                    criu_version: "4.2.1".into(),
                })
                .unwrap();
                want.concat()
            });
            let d = Dumped {
                images_are_staging: true,
                ..dumped(&bundle, &images, &work)
            };
            let t = target(share.path(), dir.path().join("staging"), compression);
            let report = publish_while_dumping(&d, &t, follow).unwrap();
            let want = criu.join().unwrap();
            assert_eq!(report.manifest.stats.criu_ms, Some(6.0));
            assert_eq!(report.manifest.stats.pages_bytes, want.len() as u64);
            // The staged page images were punched out: no blocks left.
            use std::os::unix::fs::MetadataExt;
            let staged = std::fs::metadata(images.join("pages-2.img")).unwrap();
            assert_eq!(staged.len(), 6 * 700_000);
            assert!(staged.blocks() < 64, "{} blocks left", staged.blocks());
            let f = fetch(share.path(), "job", &dir.path().join("rst"), None).unwrap();
            let got = [
                std::fs::read(f.images().join("pages-1.img")).unwrap(),
                std::fs::read(f.images().join("pages-2.img")).unwrap(),
            ]
            .concat();
            assert!(got == want, "{compression:?}");
            assert_eq!(
                std::fs::read(f.images().join("core-1.img")).unwrap(),
                b"core"
            );
        }
    }

    /// A dump that fails while its images are being archived leaves
    /// nothing on the share.
    #[test]
    fn a_dump_that_fails_while_publishing_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let (bundle, images, work) = fake_dump(dir.path());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let follow = Follow::new(&images, rx, false).unwrap();
        std::fs::write(images.join("pages-2.img"), vec![1u8; 1 << 20]).unwrap();
        tx.send(DumpEnd::Failed("CRIU was killed".into())).unwrap();
        let d = dumped(&bundle, &images, &work);
        let t = target(share.path(), dir.path().join("staging"), Compression::None);
        let e = publish_while_dumping(&d, &t, follow).unwrap_err();
        assert!(e.to_string().contains("CRIU was killed"), "{e}");
        let key = key_dir(share.path(), "job");
        let left: Vec<_> = std::fs::read_dir(&key)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
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
            // Nothing is made before the manifest is authenticated.
            assert!(
                std::fs::read_dir(&staging).map_or(true, |mut d| d.next().is_none()),
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
                limits: Default::default(),
                deadline: Default::default(),
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

    /// A hand-made archive: `members` (name, size, a reader of the data),
    /// then `manifest` and an optional MAC, as one zstd frame (as older
    /// shims wrote them, or as an attacker would).
    /// A member of a hand-made archive: name, size, its data.
    type Crafted<'a> = (&'a str, u64, Box<dyn std::io::Read>);

    fn craft(members: Vec<Crafted>, manifest: &Manifest, mac_key: Option<&[u8]>) -> Vec<u8> {
        let enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        let mut b = tar::Builder::new(enc);
        let add = |b: &mut tar::Builder<_>, name: &str, size: u64, data: &mut dyn std::io::Read| {
            let mut h = tar::Header::new_gnu();
            h.set_size(size);
            h.set_mode(0o600);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, data).unwrap();
        };
        for (name, size, mut data) in members {
            add(&mut b, name, size, &mut data);
        }
        let json = serde_json::to_vec(manifest).unwrap();
        add(
            &mut b,
            members::MANIFEST,
            json.len() as u64,
            &mut json.as_slice(),
        );
        if let Some(key) = mac_key {
            let mac = mac::sign(key, &json);
            add(
                &mut b,
                members::MANIFEST_MAC,
                mac.len() as u64,
                &mut mac.as_bytes(),
            );
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn manifest_of(members: &[(&str, u64, &str)]) -> Manifest {
        Manifest {
            format: manifest::FORMAT.into(),
            version: manifest::VERSION,
            container_id: "evil".into(),
            tenant: Some(Tenant::Containerd.id()),
            created: 0,
            criu_version: String::new(),
            kernel: String::new(),
            shim_version: String::new(),
            compression: "zstd".into(),
            tcp_established: false,
            stats: Default::default(),
            members: members
                .iter()
                .map(|(p, size, sha)| manifest::Member {
                    path: p.to_string(),
                    size: *size,
                    sha256: Some(sha.to_string()),
                    offset: None,
                })
                .collect(),
            frames: Vec::new(),
            page_source: None,
        }
    }

    /// The error fetching `key` fails with; nothing may be left staged.
    fn refusal(share: &Path, key: &str, staging: &Path) -> String {
        let err = fetch(share, key, staging, None)
            .err()
            .unwrap_or_else(|| panic!("{key} accepted"))
            .to_string();
        assert_eq!(staged_bytes(staging), 0, "{key}: staging left");
        err
    }

    /// Puts `bytes` on the share as the containerd tenant's key `key`.
    fn plant(share: &Path, key: &str, bytes: &[u8]) {
        let dir = key_dir(share, key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.criu.tar.zst"), bytes).unwrap();
    }

    fn staged_bytes(root: &Path) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            let m = e.metadata().unwrap();
                            if m.is_dir() {
                                walk(&e.path())
                            } else {
                                m.len()
                            }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(root)
    }

    #[test]
    fn a_bomb_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        // 4 GiB of zeros compress to almost nothing; the manifest says so
        // (digest irrelevant): refused by the limit, from the manifest.
        let huge = 4u64 << 30;
        let m = manifest_of(&[
            ("checkpoint/inventory.img", 1, "00"),
            ("checkpoint/pages-1.img", huge, "00"),
        ]);
        let bomb = craft(
            vec![
                ("checkpoint/inventory.img", 1, Box::new(&b"x"[..])),
                (
                    "checkpoint/pages-1.img",
                    huge,
                    Box::new(std::io::Read::take(std::io::repeat(0), huge)),
                ),
            ],
            &m,
            None,
        );
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        plant(share.path(), "bomb", &bomb);
        let staging = dir.path().join("rst");
        let limits = unpack::Limits {
            max_members: 100,
            max_member_bytes: 64 << 20,
            max_total_bytes: 64 << 20,
        };
        let started = std::time::Instant::now();
        let err = fetch_archive(&FetchRequest {
            share: share.path(),
            tenant: &Tenant::Containerd,
            reference: "bomb",
            staging_root: &staging,
            id: "c",
            wait: Duration::ZERO,
            mac_key: None,
            cross_tenant: false,
            limits,
            deadline: Default::default(),
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("more than the limit"), "{err}");
        assert_eq!(staged_bytes(&staging), 0);
        // Found by one decompressing pass that writes nothing; bounded too.
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn with_a_key_an_unsigned_archive_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let data = vec![1u8; 8 << 20];
        let sha = archive::sha256_hex(&data);
        let m = manifest_of(&[("checkpoint/inventory.img", data.len() as u64, &sha)]);
        let unsigned = craft(
            vec![(
                "checkpoint/inventory.img",
                data.len() as u64,
                Box::new(std::io::Cursor::new(data)),
            )],
            &m,
            None,
        );
        plant(share.path(), "u", &unsigned);
        let staging = dir.path().join("rst");
        let err = fetch(share.path(), "u", &staging, Some(&[3u8; 32]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not signed"), "{err}");
        assert_eq!(staged_bytes(&staging), 0);
    }

    #[test]
    fn members_that_differ_from_the_manifest_stop_the_unpack() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let inv = b"inventory".to_vec();
        let sha = archive::sha256_hex(&inv);
        let cases: Vec<(&str, Manifest, Vec<Crafted>, &str)> = vec![
            (
                "extra",
                manifest_of(&[("checkpoint/inventory.img", 9, &sha)]),
                vec![
                    (
                        "checkpoint/inventory.img",
                        9,
                        Box::new(std::io::Cursor::new(inv.clone())),
                    ),
                    ("checkpoint/core-1.img", 3, Box::new(&b"abc"[..])),
                ],
                "not in the manifest",
            ),
            (
                "resized",
                manifest_of(&[("checkpoint/inventory.img", 5, &sha)]),
                vec![(
                    "checkpoint/inventory.img",
                    9,
                    Box::new(std::io::Cursor::new(inv.clone())),
                )],
                "size differs",
            ),
            (
                "edited",
                manifest_of(&[("checkpoint/inventory.img", 9, &sha)]),
                vec![("checkpoint/inventory.img", 9, Box::new(&b"INVENTORY"[..]))],
                "checksum mismatch",
            ),
            (
                "missing",
                manifest_of(&[
                    ("checkpoint/inventory.img", 9, &sha),
                    ("checkpoint/core-1.img", 3, "00"),
                ]),
                vec![(
                    "checkpoint/inventory.img",
                    9,
                    Box::new(std::io::Cursor::new(inv.clone())),
                )],
                "is missing",
            ),
            (
                // Format 3 drops a member's digest only where frames cover it.
                "undigested",
                Manifest {
                    members: vec![manifest::Member {
                        sha256: None,
                        ..manifest_of(&[("checkpoint/inventory.img", 9, &sha)]).members[0].clone()
                    }],
                    ..manifest_of(&[])
                },
                vec![(
                    "checkpoint/inventory.img",
                    9,
                    Box::new(std::io::Cursor::new(inv.clone())),
                )],
                "no frame table covers it",
            ),
            (
                "traversal",
                manifest_of(&[
                    ("checkpoint/inventory.img", 9, &sha),
                    ("checkpoint/../../etc/x", 3, "00"),
                ]),
                vec![(
                    "checkpoint/inventory.img",
                    9,
                    Box::new(std::io::Cursor::new(inv.clone())),
                )],
                "path traversal",
            ),
        ];
        for (key, m, members_, why) in cases {
            plant(share.path(), key, &craft(members_, &m, None));
            let staging = dir.path().join(key);
            let err = fetch(share.path(), key, &staging, None)
                .err()
                .unwrap_or_else(|| panic!("{key} accepted"))
                .to_string();
            assert!(err.contains(why), "{key}: {why:?} not in {err}");
            assert_eq!(staged_bytes(&staging), 0, "{key}: staging left");
        }
    }

    #[test]
    fn a_passed_deadline_stops_the_unpack() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        publish_one(dir.path(), share.path(), Compression::None);
        let staging = dir.path().join("rst");
        let err = fetch_archive(&FetchRequest {
            share: share.path(),
            tenant: &Tenant::Containerd,
            reference: "job",
            staging_root: &staging,
            id: "c",
            wait: Duration::ZERO,
            mac_key: None,
            cross_tenant: false,
            limits: Default::default(),
            deadline: unpack::Deadline(Some(std::time::Instant::now())),
        })
        .err()
        .unwrap();
        assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
        assert_eq!(staged_bytes(&staging), 0);
    }

    #[test]
    fn compressed_archives_carry_an_index_to_their_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let report = publish_one(
            dir.path(),
            share.path(),
            Compression::Zstd {
                level: 1,
                workers: 2,
            },
        );
        let mut f = std::fs::File::open(&report.archive).unwrap();
        let t = unpack::read_trailer(&mut f, "x", &Default::default()).unwrap();
        let m: Manifest = serde_json::from_slice(&t.manifest.unwrap()).unwrap();
        assert_eq!(m.members.len(), report.manifest.members.len());
        // Plain zstd | tar still reads it whole, manifest last.
        let dec = zstd::stream::read::Decoder::new(std::fs::File::open(&report.archive).unwrap())
            .unwrap();
        let names: Vec<String> = tar::Archive::new(dec)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names.last().map(String::as_str), Some(members::MANIFEST));
    }

    /// No input panics the reader: every byte of small archives (zstd with
    /// its index, stored frames, plain tar, and the older single-frame layout) mutated in
    /// turn, and bounded random mutations. Extra seeds may be kept in
    /// `shim/fuzz/corpus/` (any file there is used as a starting point).
    #[test]
    fn mutated_archives_never_panic_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        for (i, compression) in [
            Compression::Zstd {
                level: 1,
                workers: 1,
            },
            // Stored frames (the destination keeps up): raw blocks.
            Compression::Adaptive {
                level: 1,
                workers: 1,
            },
            Compression::None,
        ]
        .into_iter()
        .enumerate()
        {
            let (bundle, images, work) = fake_dump(&dir.path().join(format!("seed-{i}")));
            std::fs::write(images.join("pages-1.img"), b"small pages").unwrap();
            let d = dumped(&bundle, &images, &work);
            let t = Target {
                name: format!("seed-{i}"),
                mac_key: Some(vec![5u8; 32]),
                ..target(share.path(), dir.path().join("staging"), compression)
            };
            let r = publish_checkpoint(&d, &t).unwrap();
            seeds.push(std::fs::read(&r.archive).unwrap());
        }
        let m = manifest_of(&[("checkpoint/inventory.img", 1, "00")]);
        seeds.push(craft(
            vec![("checkpoint/inventory.img", 1, Box::new(&b"x"[..]))],
            &m,
            None,
        ));
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for e in std::fs::read_dir(&corpus).into_iter().flatten().flatten() {
            seeds.push(std::fs::read(e.path()).unwrap());
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let limits = unpack::Limits {
            max_members: 64,
            max_member_bytes: 1 << 20,
            max_total_bytes: 4 << 20,
        };
        let options = unpack::Options {
            limits,
            key: Some(&[5u8; 32]),
            deadline: Default::default(),
        };
        let mut tries = 0;
        for seed in &seeds {
            let mut variants: Vec<Vec<u8>> = Vec::new();
            let step = (seed.len() / 400).max(1);
            for i in (0..seed.len()).step_by(step) {
                let mut b = seed.clone();
                b[i] ^= 1 << (next() % 8);
                variants.push(b);
            }
            for _ in 0..200 {
                let mut b = seed.clone();
                for _ in 0..(1 + next() % 8) {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                if next() % 4 == 0 {
                    b.truncate((next() as usize) % b.len());
                }
                variants.push(b);
            }
            for v in variants {
                let path = dir.path().join("case");
                std::fs::write(&path, &v).unwrap();
                let out = dir.path().join(format!("out-{tries}"));
                std::fs::create_dir(&out).unwrap();
                let f = std::fs::File::open(&path).unwrap();
                let _ = unpack::unpack(f, &out, "fuzz", &options);
                std::fs::remove_dir_all(&out).unwrap();
                tries += 1;
            }
        }
        assert!(tries > 1000, "{tries}");
    }
}
