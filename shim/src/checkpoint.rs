//! The Checkpoint RPC: dump with CRIU (through runc), then publish to the
//! share when the container or the caller names a destination.
//!
//! Two callers ask for checkpoints. containerd (`ctr task checkpoint`, CRI
//! CheckpointContainer) sends runc's CheckpointOptions and wants the images
//! in the path it gives. Our CLI sends a [`CheckpointRequest`]; its images
//! are staged locally and only the archive leaves the node.
//!
//! Exit-mode checkpoints that publish keep the dumped tasks stopped until
//! the archive is on the share, and only then kill them: if anything fails
//! the container resumes and nothing is lost.
//!
//! A pod checkpoint (`--pod`) freezes every container of the pod before it
//! dumps any, so containers that talk to each other (over localhost, a
//! shared volume) are captured at one instant, and publishes all of them or
//! none.

pub mod post_copy;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::api;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::CheckpointOptions;

use crate::container::{Container, DumpStats};
use crate::criu_front::env as front_env;
use crate::error::{Error, Result};
use crate::messages::{ArchiveReport, CheckpointReport, FileMessage, ProgressReport};
pub use crate::messages::{CheckpointRequest, CHECKPOINT_REQUEST_TYPE};
use crate::migrate::follow::{DumpEnd, Follow};
use crate::migrate::share::{self, Share, Tenant};
use crate::migrate::{self, archive::Compression, stage::Staging, Report};
use crate::process::Status;
use crate::runc::CriuArgs;
use crate::spec::Spec;
use criu_shim_config::{CompressionSetting, PublishMode};

impl CheckpointRequest {
    pub fn from_options(req: &api::CheckpointTaskRequest) -> Result<Option<CheckpointRequest>> {
        match req
            .options
            .as_ref()
            .filter(|a| a.type_url == CHECKPOINT_REQUEST_TYPE)
        {
            Some(any) => serde_json::from_slice(&any.value)
                .map(Some)
                .map_err(|e| Error::InvalidArgument(format!("checkpoint request: {e}"))),
            None => Ok(None),
        }
    }

    /// The request's compression, else the node's setting.
    fn compression(&self, setting: CompressionSetting) -> Compression {
        match self.compression_level {
            Some(0) => Compression::None,
            Some(level) => Compression::Zstd {
                level,
                workers: workers(),
            },
            None => compression_of(setting),
        }
    }

    /// The share key: ours, else the container's annotation.
    fn destination(&self, spec: &Spec) -> Result<String> {
        self.to
            .clone()
            .or_else(|| spec.checkpoint_to().map(str::to_string))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "no destination: give --to NAME or set the {} annotation",
                    criu_shim_config::ANNOTATION_CHECKPOINT_TO
                ))
            })
    }

    /// runc arguments for a dump into fresh local staging. runc must not
    /// destroy the container: exiting is ours to do, after publishing.
    fn staged_args(&self, staging: &Staging) -> CriuArgs {
        CriuArgs {
            image_path: staging.images(),
            work_path: staging.path().join("work"),
            leave_running: true,
            tcp_established: self.tcp_established,
            file_locks: self.file_locks,
            ext_unix_sk: self.ext_unix_sk,
            ..Default::default()
        }
    }
}

/// The node's compression setting as the archive writer's.
fn compression_of(setting: CompressionSetting) -> Compression {
    match setting {
        CompressionSetting::Auto => Compression::Adaptive {
            level: 1,
            workers: workers(),
        },
        CompressionSetting::None => Compression::None,
        CompressionSetting::Level(level) => Compression::Zstd {
            level,
            workers: workers(),
        },
    }
}

/// Compressor threads: one per core (CRIU has finished with its share of
/// them by the time most chunks are compressed).
fn workers() -> u32 {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8) as u32)
}

/// What a Checkpoint RPC asks for, read once (the request, the
/// container's annotations, the node's settings) before anything is
/// frozen. containerd's requests and our CLI's end in the same three
/// plans; each runs straight through its own function.
pub enum Plan {
    /// One container: containerd's images, an archive on the share, or
    /// both.
    Container(ContainerPlan),
    /// Every container of the pod, frozen at one instant and published
    /// all or none (`--pod`, or the kubelet asking for one container of a
    /// pod annotated `criu-shim.io/checkpoint-pod`).
    Pod(PodPlan),
    /// The container moves post-copy: its memory is served from here to
    /// the node that restores it (`--post-copy`, or the kubelet asking for
    /// a container annotated `criu-shim.io/migration: post-copy`).
    PostCopy(PostCopyPlan),
}

impl Plan {
    pub fn of(c: &Container, req: &api::CheckpointTaskRequest) -> Result<Plan> {
        let spec = Spec::read(&c.bundle);
        match CheckpointRequest::from_options(req)? {
            Some(r) => Plan::for_cli(c, &spec, r, req),
            None => Plan::for_containerd(c, &spec, req),
        }
    }

    /// Our CLI's request; its directory (the RPC's path) gets progress and
    /// the report.
    fn for_cli(
        c: &Container,
        spec: &Spec,
        r: CheckpointRequest,
        req: &api::CheckpointTaskRequest,
    ) -> Result<Plan> {
        let cli_dir = Some(PathBuf::from(&req.path)).filter(|p| !p.as_os_str().is_empty());
        if r.post_copy && r.pod {
            return Err(Error::InvalidArgument(
                "post-copy moves one container; a pod checkpoint (--pod) is cold".into(),
            ));
        }
        if r.post_copy {
            let to = Destination::of(c, spec, &r.destination(spec)?)?;
            return Ok(Plan::PostCopy(PostCopyPlan {
                asked: post_copy::Asked {
                    progress: cli_dir.clone(),
                    handover: None,
                },
                request: r,
                to,
                report_dir: cli_dir,
            }));
        }
        if r.pod {
            return Ok(Plan::Pod(PodPlan {
                request: r,
                containerd_wants: None,
                report_dir: cli_dir,
            }));
        }
        let to = Destination::of(c, spec, &r.destination(spec)?)?;
        let staging = Staging::new(&c.config.staging_dir, &format!("dump-{}", c.id))?;
        Ok(Plan::Container(ContainerPlan {
            from_cli: true,
            args: r.staged_args(&staging),
            to: Some(to),
            exit_after: !r.leave_running,
            compression: r.compression(c.config.compression),
            handover: None,
            report_dir: cli_dir,
            _staging: Some(staging),
        }))
    }

    /// containerd's request (`ctr task checkpoint`, the kubelet's
    /// checkpoint API): runc's CheckpointOptions, the images wanted in
    /// its path; the container's annotations say where else they go.
    fn for_containerd(
        c: &Container,
        spec: &Spec,
        req: &api::CheckpointTaskRequest,
    ) -> Result<Plan> {
        let mut args = containerd_args(req, &c.bundle)?;
        // Only the share's annotations make this more than a runc dump.
        let as_cli_would = || CheckpointRequest {
            leave_running: args.leave_running,
            tcp_established: args.tcp_established,
            file_locks: args.file_locks,
            ext_unix_sk: args.ext_unix_sk,
            ..Default::default()
        };
        if post_copy_wanted(spec, c.config.migration)? {
            let r = CheckpointRequest {
                leave_running: false,
                post_copy: true,
                ..as_cli_would()
            };
            let to = Destination::of(c, spec, &r.destination(spec)?)?;
            return Ok(Plan::PostCopy(PostCopyPlan {
                request: r,
                to,
                asked: post_copy::Asked {
                    progress: None,
                    handover: Some(args.image_path),
                },
                report_dir: None,
            }));
        }
        if spec.checkpoint_pod() {
            let r = CheckpointRequest {
                pod: true,
                ..as_cli_would()
            };
            // Exiting is ours to do, after publishing.
            args.leave_running = true;
            return Ok(Plan::Pod(PodPlan {
                request: r,
                containerd_wants: Some((c.id.clone(), args)),
                report_dir: None,
            }));
        }
        let to = spec
            .checkpoint_to()
            .map(|key| Destination::of(c, spec, key))
            .transpose()?;
        let (mut handover, mut own) = (None, None);
        if to.is_some() {
            // The share is this checkpoint's home: dump into our staging,
            // and hand containerd the images without their memory pages.
            let staging = Staging::new(&c.config.staging_dir, &format!("dump-{}", c.id))?;
            handover = Some(std::mem::replace(&mut args.image_path, staging.images()));
            own = Some(staging);
        }
        Ok(Plan::Container(ContainerPlan {
            from_cli: false,
            exit_after: to.is_some() && !args.leave_running,
            args,
            to,
            compression: compression_of(c.config.compression),
            handover,
            report_dir: None,
            _staging: own,
        }))
    }

    /// Runs the plan for `c`; `pod` lists the running containers of its
    /// pod (asked only by a pod plan).
    pub fn run(self, c: &Arc<Container>, pod: impl FnOnce() -> Vec<Member>) -> Result<()> {
        match self {
            Plan::Container(p) => checkpoint(c, p).map(drop),
            Plan::Pod(p) => pod_checkpoint(&pod(), p).map(drop),
            Plan::PostCopy(p) => {
                let report = post_copy::checkpoint(c, &p.request, p.to, p.asked)?;
                if let Some(dir) = &p.report_dir {
                    write_report(dir, &[&report]);
                }
                Ok(())
            }
        }
    }
}

/// One container's checkpoint: what CRIU is asked for, where the archive
/// goes and what happens after.
pub struct ContainerPlan {
    /// Our CLI asked (else containerd's Checkpoint RPC).
    from_cli: bool,
    args: CriuArgs,
    /// Where the archive goes; none: only the images containerd asked for.
    to: Option<Destination>,
    /// Kill the container once its archive is published.
    exit_after: bool,
    compression: Compression,
    /// containerd's images directory: it gets every image but the pages
    /// (see [`hand_over`]).
    handover: Option<PathBuf>,
    /// Our CLI's directory: progress while publishing, then the report.
    report_dir: Option<PathBuf>,
    /// Local staging of the dump, removed with the plan.
    _staging: Option<Staging>,
}

/// A pod's checkpoint. The destination key is decided by the first member
/// (the pod's annotations are the same on all of them).
pub struct PodPlan {
    request: CheckpointRequest,
    /// containerd asked through one member: its id, and the runc
    /// arguments that put that member's images where containerd wants.
    containerd_wants: Option<(String, CriuArgs)>,
    report_dir: Option<PathBuf>,
}

/// A post-copy checkpoint, its destination checked.
pub struct PostCopyPlan {
    request: CheckpointRequest,
    to: Destination,
    asked: post_copy::Asked,
    report_dir: Option<PathBuf>,
}

/// A running container of a pod, with its spec (read once).
pub struct Member {
    pub container: Arc<Container>,
    pub spec: Spec,
}

/// One container's checkpoint, from containerd or our CLI.
fn checkpoint(c: &Container, mut plan: ContainerPlan) -> Result<Option<Report>> {
    // Before anything is frozen: a lazy restore's pages must all be in.
    c.memory_in_place(Duration::from_secs(c.config.criu_timeout_secs))?;
    let Some(to) = plan.to.take() else {
        dump(c, &plan.args, &[])?;
        return Ok(None);
    };
    let (exit_after, compression) = (plan.exit_after, plan.compression);
    // Our CLI's checkpoints freeze the container first: CRIU then finds it
    // frozen and skips its own freezing, which polls the cgroup v1 freezer
    // in 100 ms steps (a tenth of a second of downtime at every size), and
    // leaves it frozen. containerd's path arrives paused already (its
    // client pauses).
    let mut frozen = Frozen::default();
    if plan.from_cli {
        frozen.freeze(c)?;
    }
    let env: Vec<(&str, &str)> = if exit_after && !frozen.any() {
        // Dump, keep the tasks stopped, and only kill them once the
        // archive is safely on the share.
        plan.args.leave_running = true;
        vec![(front_env::DUMP_LEAVE_STOPPED, "1")]
    } else {
        Vec::new()
    };
    // A container that goes on runs again as soon as its state is taken
    // (dump ended, writable-layer changes staged), not after publishing;
    // so does one containerd paused for this checkpoint, before
    // containerd's own export and Resume.
    let paused_by_containerd = !plan.from_cli && c.init.status() == Status::Paused;
    let thaw_when_taken = !exit_after && (frozen.any() || paused_by_containerd);
    let args = &plan.args;
    // Our CLI waits on this RPC: tell it how far we are.
    let reporter = plan
        .report_dir
        .as_ref()
        .map(|dir| Reporter::start(dir.clone(), args.image_path.clone()));
    let progress = reporter.as_ref().map(Reporter::archived);
    let after_dump = || {
        if let Some(r) = &reporter {
            r.publishing(dir_size(&args.image_path));
        }
    };
    // What we froze, else what containerd paused for us.
    let mut thaw = || {
        if frozen.any() {
            frozen.thaw_all();
        } else {
            thaw_for_containerd(c);
        }
    };
    let published = match c.config.publish {
        PublishMode::Stream => {
            let how = Streaming {
                compression,
                progress,
                thaw: thaw_when_taken.then(|| Box::new(thaw) as Box<dyn FnOnce() + '_>),
            };
            publish_while_dumping(c, args, &env, &to, how, after_dump)?
        }
        PublishMode::Staged => {
            let stats = dump(c, args, &env)?;
            after_dump();
            let how = Writing::after_dump(compression, progress);
            let published = publish(c, args, &stats, &to, how);
            if thaw_when_taken {
                thaw();
            }
            published
        }
    };
    let published = published.and_then(|report| match &plan.handover {
        Some(dir) => hand_over(&args.image_path, dir).map(|()| report),
        None => Ok(report),
    });
    match published {
        Ok(report) => {
            if exit_after {
                // runc kills a frozen container's tasks and thaws it: they
                // die without running another instruction.
                c.runc_kill_all(libc::SIGKILL as u32)?;
                frozen.release();
            }
            if let Some(dir) = &plan.report_dir {
                write_report(dir, &[&report]);
            }
            Ok(Some(report))
        }
        Err(e) => {
            // What we froze thaws as `frozen` goes; tasks a dump left
            // stopped get SIGCONT.
            if exit_after && !frozen.any() {
                c.resume_stopped();
            }
            Err(e)
        }
    }
}

/// Whether containerd's Checkpoint RPC for `spec`'s container is a
/// post-copy one: a destination, and the migration mode post-copy.
fn post_copy_wanted(spec: &Spec, node: criu_shim_config::MigrationMode) -> Result<bool> {
    Ok(spec.checkpoint_to().is_some()
        && spec.migration(node)? == criu_shim_config::MigrationMode::PostCopy)
}

/// A pod checkpoint: `members` (the pod's containers, not its sandbox)
/// are all frozen, then dumped one by one, then published; the pod goes on
/// (`leave_running`) or its containers are killed once every archive is on
/// the share. Any failure thaws them all and removes what was published.
fn pod_checkpoint(members: &[Member], plan: PodPlan) -> Result<Vec<Report>> {
    let r = &plan.request;
    let first = members
        .first()
        .ok_or_else(|| Error::FailedPrecondition("the pod has no running containers".into()))?;
    let key = r.destination(&first.spec)?;
    // Every member's destination checked before anything is frozen.
    let destinations = members
        .iter()
        .map(|m| Destination::of(&m.container, &m.spec, &key))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    let mut frozen = Frozen::default();
    for m in members {
        frozen.freeze(&m.container)?;
    }
    log::info!(
        "pod checkpoint: froze {} containers in {:?}",
        members.len(),
        started.elapsed()
    );
    let mut dumps = Vec::new();
    for m in members {
        let c = &m.container;
        let staging = Staging::new(&c.config.staging_dir, &format!("dump-{}", c.id))?;
        let args = match &plan.containerd_wants {
            Some((id, args)) if *id == c.id => args.clone(),
            _ => r.staged_args(&staging),
        };
        // The freezer is ours: CRIU finds it frozen and leaves it so.
        let stats = dump(c, &args, &[])?;
        dumps.push((c, staging, args, stats));
    }
    let mut published: Vec<Report> = Vec::new();
    for ((c, _, args, stats), to) in dumps.iter().zip(&destinations) {
        let compression = r.compression(c.config.compression);
        match publish(c, args, stats, to, Writing::after_dump(compression, None)) {
            Ok(report) => published.push(report),
            Err(e) => {
                // All or nothing: a partial pod must not be restorable.
                for p in &published {
                    log::warn!(
                        "pod checkpoint failed at {}: taking back {}",
                        c.id,
                        p.archive.display()
                    );
                    migrate::unpublish(p);
                }
                return Err(e);
            }
        }
    }
    if !r.leave_running {
        for m in members {
            m.container.runc_kill_all(libc::SIGKILL as u32)?;
        }
    }
    frozen.thaw_all();
    log::info!(
        "pod checkpoint of {} containers done in {:?} (pod frozen throughout)",
        members.len(),
        started.elapsed()
    );
    if let Some(dir) = &plan.report_dir {
        write_report(dir, &published.iter().collect::<Vec<_>>());
    }
    Ok(published)
}

/// Containers this checkpoint froze; thawed by [`Frozen::thaw_all`]
/// after success, or when dropped on an error, which also undoes what a
/// failed dump may have left (stopped tasks, CRIU's network lock).
/// Containers the user had paused stay paused.
#[derive(Default)]
struct Frozen<'a> {
    by_us: Vec<&'a Container>,
}

impl<'a> Frozen<'a> {
    fn freeze(&mut self, c: &'a Container) -> Result<()> {
        if c.init.status() == Status::Running {
            c.pause()?;
            self.by_us.push(c);
        }
        Ok(())
    }

    fn thaw_all(&mut self) {
        self.thaw(false);
    }

    fn any(&self) -> bool {
        !self.by_us.is_empty()
    }

    /// Forgets the containers: they are being killed (runc thaws them as
    /// it does).
    fn release(&mut self) {
        self.by_us.clear();
    }

    fn thaw(&mut self, after_failure: bool) {
        for c in self.by_us.drain(..) {
            if after_failure {
                c.thaw_after_failed_checkpoint();
            } else if let Err(e) = c.resume() {
                log::warn!("thaw {} after its checkpoint: {e}", c.id);
            }
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.thaw(true);
    }
}

fn dump(c: &Container, args: &CriuArgs, env: &[(&str, &str)]) -> Result<DumpStats> {
    let started = Instant::now();
    let stats = c.checkpoint(args, env)?;
    log::info!(
        "checkpointed {} in {:?} (CRIU {:.0} ms, frozen {:.0} ms)",
        c.id,
        started.elapsed(),
        stats.criu_ms.unwrap_or(0.0),
        stats.frozen_ms.unwrap_or(0.0)
    );
    Ok(stats)
}

/// Where a container's checkpoint goes, checked before anything is
/// frozen: a name inside the share, in the container's tenant's part, on a
/// share that is there, with a usable key if one is configured.
struct Destination {
    tenant: Tenant,
    name: String,
    mac_key: Option<Vec<u8>>,
    /// The container's name in its pod and its image, for config.dump.
    container_name: Option<String>,
    image: Option<String>,
}

impl Destination {
    fn of(c: &Container, spec: &Spec, key: &str) -> Result<Destination> {
        let name = share::per_container(key, spec.container_name());
        share::check_name(&name)?;
        let tenant = spec.tenant()?;
        Share::open(&c.config.share_dir)?.tenant(&tenant, true)?;
        let mac_key = migrate::mac::configured(c.config.archive_key_file.as_deref())?;
        Ok(Destination {
            tenant,
            name,
            mac_key,
            container_name: spec.container_name().map(str::to_string),
            image: spec.image_name().map(str::to_string),
        })
    }
}

/// The images go to our own staging, not to a directory containerd reads
/// afterwards (its export for `ctr checkpoint` and the CRI).
fn images_are_staging(c: &Container, args: &CriuArgs) -> bool {
    args.image_path.starts_with(&c.config.staging_dir)
}

/// What containerd gets in the images directory it asked for when the
/// checkpoint went to the share: every image but the memory pages (the
/// process tree, files, sockets: what `checkpointctl inspect` shows). Its
/// export (and the kubelet's checkpoint tar) then costs megabytes, not a
/// second full copy of the memory; the memory is in the share's archive.
fn hand_over(images: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let entries = std::fs::read_dir(images)
        .map_err(|e| Error::io(format!("read {}", images.display()), e))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file || name.to_string_lossy().starts_with("pages-") {
            continue;
        }
        std::fs::copy(e.path(), dir.join(&name)).map_err(|err| {
            Error::io(
                format!("hand {} over to containerd", e.path().display()),
                err,
            )
        })?;
    }
    Ok(())
}

/// How a streaming checkpoint publishes.
struct Streaming<'a> {
    compression: Compression,
    progress: Option<Arc<AtomicU64>>,
    /// Thaws the container once its state is taken (dumped, and its
    /// writable layer's changes staged), not after publishing.
    thaw: Option<Box<dyn FnOnce() + 'a>>,
}

/// Dumps `c` and publishes its images as `to` at the same time (see
/// [`migrate::follow`]). A failed dump returns its error (the container
/// was recovered by the dump); a failed publish after a good dump returns
/// `Ok(Err(..))`: the caller decides what happens to the stopped tasks.
fn publish_while_dumping(
    c: &Container,
    args: &CriuArgs,
    env: &[(&str, &str)],
    to: &Destination,
    how: Streaming,
    after_dump: impl FnOnce(),
) -> Result<Result<Report>> {
    let Streaming {
        compression,
        progress,
        thaw,
    } = how;
    let (end_tx, end_rx) = std::sync::mpsc::sync_channel(1);
    let follow = Follow::new(&args.image_path, end_rx, images_are_staging(c, args))?;
    let (taken_tx, taken_rx) = std::sync::mpsc::sync_channel(1);
    let taken_tx = thaw.is_some().then_some(taken_tx);
    let no_stats = DumpStats::default();
    std::thread::scope(|s| {
        let publisher = s.spawn(|| {
            let follow = Some(follow);
            let how = Writing {
                compression,
                progress,
                follow,
                state_taken: taken_tx,
                page_source: None,
            };
            publish(c, args, &no_stats, to, how)
        });
        let stats = match dump(c, args, env) {
            Ok(stats) => stats,
            Err(e) => {
                let _ = end_tx.send(DumpEnd::Failed(e.to_string()));
                let _ = publisher.join();
                return Err(e);
            }
        };
        // The publisher may have failed already and stopped listening.
        let _ = end_tx.send(DumpEnd::Done {
            frozen_ms: stats.frozen_ms,
            criu_ms: stats.criu_ms,
            criu_version: criu_version(c),
        });
        // Closed without a word if the publisher failed first (then the
        // caller's error path thaws).
        if let Some(thaw) = thaw {
            if taken_rx.recv().is_ok() {
                thaw();
            }
        }
        after_dump();
        Ok(publisher
            .join()
            .unwrap_or_else(|_| Err(Error::Other("the publisher panicked".into()))))
    })
}

/// The CRIU version, for the manifest. Inside the shim server
/// containerd-shim reaps every child: CRIU's exit must come from its
/// monitor, like every other child's.
fn criu_version(c: &Container) -> String {
    criu_sys::Criu::new(&c.config.criu)
        .with_reaper(Arc::new(crate::reaper::MonitorReaper))
        .version()
        .map(|v| v.to_string())
        .unwrap_or_default()
}

/// Resumes `c` (paused by containerd for its checkpoint) now; containerd's
/// Resume, after its export, then finds it running.
fn thaw_for_containerd(c: &Container) {
    match c.resume() {
        Ok(()) => {
            c.thawed_early.store(true, Ordering::SeqCst);
            log::info!("{}: thawed once its state was taken", c.id);
        }
        Err(e) => log::warn!("{}: thaw after the dump: {e}", c.id),
    }
}

/// How one archive is written, beyond where.
struct Writing {
    compression: Compression,
    progress: Option<Arc<AtomicU64>>,
    /// Archive the images while CRIU writes them.
    follow: Option<Follow>,
    /// Told once the container's state is all taken.
    state_taken: Option<std::sync::mpsc::SyncSender<()>>,
    /// Post-copy: the memory stays with the source, served from here.
    page_source: Option<migrate::manifest::PageSourceRef>,
}

impl Writing {
    fn after_dump(compression: Compression, progress: Option<Arc<AtomicU64>>) -> Writing {
        Writing {
            compression,
            progress,
            follow: None,
            state_taken: None,
            page_source: None,
        }
    }
}

/// stage -> archive -> publish the images `args` points at, as `to`;
/// while CRIU still writes them if `how` follows them.
fn publish(
    c: &Container,
    args: &CriuArgs,
    dump: &DumpStats,
    to: &Destination,
    how: Writing,
) -> Result<Report> {
    let Writing {
        compression,
        progress,
        follow,
        state_taken,
        page_source,
    } = how;
    let target = migrate::Target {
        state_taken,
        share: c.config.share_dir.clone(),
        tenant: to.tenant.clone(),
        name: to.name.clone(),
        compression,
        staging_root: c.config.staging_dir.clone(),
        mac_key: to.mac_key.clone(),
        progress,
    };
    // While following, the dumping thread asks once the dump has ended:
    // CRIU runs one at a time.
    let criu_version = if follow.is_some() {
        String::new()
    } else {
        criu_version(c)
    };
    let dumped = migrate::Dumped {
        container_id: &c.id,
        name: to.container_name.as_deref(),
        image: to.image.as_deref(),
        bundle: &c.bundle,
        rootfs_upper: c.upperdir.clone(),
        images: &args.image_path,
        images_are_staging: images_are_staging(c, args),
        work: &args.work_path,
        tcp_established: args.tcp_established,
        frozen_ms: dump.frozen_ms,
        criu_ms: dump.criu_ms,
        criu_version,
        page_source,
    };
    let report = match follow {
        Some(f) => migrate::publish_while_dumping(&dumped, &target, f)?,
        None => migrate::publish_checkpoint(&dumped, &target)?,
    };
    log::info!("{}: {}", c.id, report.summary());
    Ok(report)
}

/// Writes [`ProgressReport`]s into the CLI's directory twice a second while
/// a checkpoint runs: the images' size during the dump, then the bytes
/// archived of the total while publishing. Stops when dropped.
struct Reporter {
    /// Dropped to stop the thread: it wakes at once (a sleeping thread
    /// would hold every checkpoint up to half a second at its end).
    stop: Option<std::sync::mpsc::Sender<()>>,
    /// Bytes archived so far, and the total once publishing started.
    archived: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    fn start(dir: PathBuf, images: PathBuf) -> Reporter {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let archived = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let (a, t) = (archived.clone(), total.clone());
        let thread = std::thread::spawn(move || {
            let every = std::time::Duration::from_millis(500);
            loop {
                let total = t.load(Ordering::SeqCst);
                let report = if total == 0 {
                    ProgressReport {
                        phase: "dump".into(),
                        done_bytes: dir_size(&images),
                        total_bytes: None,
                    }
                } else {
                    ProgressReport {
                        phase: "publish".into(),
                        done_bytes: a.load(Ordering::SeqCst),
                        total_bytes: Some(total),
                    }
                };
                // The CLI shows what it last read; a missed update is harmless.
                let _ = report.write(&dir);
                if stopped.recv_timeout(every) != Err(RecvTimeoutError::Timeout) {
                    return;
                }
            }
        });
        Reporter {
            stop: Some(stop),
            archived,
            total,
            thread: Some(thread),
        }
    }

    /// The counter the archive writer advances.
    fn archived(&self) -> Arc<AtomicU64> {
        self.archived.clone()
    }

    /// The dump has ended with `total` bytes of images to publish.
    fn publishing(&self, total: u64) {
        self.total.store(total.max(1), Ordering::SeqCst);
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes of the files directly in `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// containerd's CheckpointOptions, as runc arguments.
fn containerd_args(req: &api::CheckpointTaskRequest, bundle: &Path) -> Result<CriuArgs> {
    let o = match req.options.as_ref().filter(|a| !a.value.is_empty()) {
        Some(any) => CheckpointOptions::parse_from_bytes(&any.value).map_err(|e| {
            Error::InvalidArgument(format!("checkpoint options ({}): {e}", any.type_url))
        })?,
        None => CheckpointOptions::default(),
    };
    let image_path = if !req.path.is_empty() {
        PathBuf::from(&req.path)
    } else if !o.image_path.is_empty() {
        PathBuf::from(&o.image_path)
    } else {
        return Err(Error::InvalidArgument(
            "checkpoint without an image path".into(),
        ));
    };
    let work_path = if o.work_path.is_empty() {
        bundle.join("checkpoint-work")
    } else {
        PathBuf::from(&o.work_path)
    };
    Ok(CriuArgs {
        image_path,
        work_path,
        leave_running: !o.exit,
        tcp_established: o.open_tcp,
        ext_unix_sk: o.external_unix_sockets,
        shell_job: o.terminal,
        file_locks: o.file_locks,
        empty_ns: o.empty_namespaces.clone(),
        cgroups_mode: Some(o.cgroups_mode.clone()).filter(|m| !m.is_empty()),
        lazy_pages: false,
        page_server: None,
    })
}

pub fn write_report(dir: &Path, reports: &[&Report]) {
    let report = CheckpointReport {
        archives: reports
            .iter()
            .map(|r| ArchiveReport {
                archive: r.archive.clone(),
                archive_bytes: r.archive_bytes,
                images_bytes: r.images_bytes,
                publish_seconds: r.publish_time.as_secs_f64(),
                frozen_ms: r.manifest.stats.frozen_ms,
                criu_ms: r.manifest.stats.criu_ms,
            })
            .collect(),
        summary: reports
            .iter()
            .map(|r| r.summary())
            .collect::<Vec<_>>()
            .join("\n"),
    };
    if let Err(e) = report.write(dir) {
        log::warn!("cannot write checkpoint report: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::tests::configured;
    use crate::runc::fake::Fake;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;

    /// A running container on the fake runtime with `annotations`, on a
    /// node whose share and staging are temporary directories.
    struct Node {
        dirs: tempfile::TempDir,
        c: Container,
    }

    fn node(annotations: serde_json::Value) -> Node {
        let dirs = tempfile::tempdir().unwrap();
        let (bundle, share, staging) = (
            dirs.path().join("bundle"),
            dirs.path().join("share"),
            dirs.path().join("staging"),
        );
        for d in [&bundle, &share, &staging] {
            std::fs::create_dir(d).unwrap();
        }
        let spec = serde_json::json!({ "annotations": annotations });
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        let mut config = criu_shim_config::ShimConfig::defaults("test");
        config.share_dir = share;
        config.staging_dir = staging;
        let c = configured(&bundle, Arc::new(Fake::default()), false, "c", config);
        c.start().unwrap();
        Node { dirs, c }
    }

    /// containerd's request: runc's options, the images wanted in `path`.
    fn from_containerd(path: &Path, exit: bool) -> api::CheckpointTaskRequest {
        let options = CheckpointOptions {
            exit,
            open_tcp: true,
            ..Default::default()
        };
        api::CheckpointTaskRequest {
            id: "c".into(),
            path: path.to_string_lossy().into_owned(),
            options: Some(Any {
                type_url: "containerd.runc.v1.CheckpointOptions".into(),
                value: options.write_to_bytes().unwrap(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }

    /// Our CLI's request, its directory `dir`.
    fn from_cli(dir: &Path, r: &CheckpointRequest) -> api::CheckpointTaskRequest {
        api::CheckpointTaskRequest {
            id: "c".into(),
            path: dir.to_string_lossy().into_owned(),
            options: Some(Any {
                type_url: CHECKPOINT_REQUEST_TYPE.into(),
                value: serde_json::to_vec(r).unwrap(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn containerd_s_request_without_a_destination_is_runc_s_dump_into_its_path() {
        let n = node(serde_json::json!({}));
        let images = n.dirs.path().join("images");
        let Plan::Container(p) = Plan::of(&n.c, &from_containerd(&images, false)).unwrap() else {
            panic!("not a container plan");
        };
        assert!(p.to.is_none() && p.handover.is_none() && p.report_dir.is_none());
        assert_eq!(p.args.image_path, images);
        assert!(p.args.leave_running && p.args.tcp_established);
        assert!(!p.exit_after, "containerd's own checkpoint: runc decides");
    }

    #[test]
    fn containerd_s_request_with_a_destination_dumps_into_staging_and_hands_over() {
        let n = node(serde_json::json!({ criu_shim_config::ANNOTATION_CHECKPOINT_TO: "job" }));
        let images = n.dirs.path().join("images");
        let Plan::Container(p) = Plan::of(&n.c, &from_containerd(&images, true)).unwrap() else {
            panic!("not a container plan");
        };
        assert_eq!(p.to.as_ref().map(|t| t.name.as_str()), Some("job"));
        assert_eq!(p.handover.as_deref(), Some(images.as_path()));
        assert!(images_are_staging(&n.c, &p.args), "{:?}", p.args.image_path);
        assert!(p.exit_after, "exit asked: killed once published");
        assert!(
            p.report_dir.is_none(),
            "nothing of ours in containerd's images"
        );
    }

    #[test]
    fn containerd_s_request_for_a_pod_member_plans_the_whole_pod() {
        let n = node(serde_json::json!({
            criu_shim_config::ANNOTATION_CHECKPOINT_TO: "job",
            criu_shim_config::ANNOTATION_CHECKPOINT_POD: "true",
        }));
        let images = n.dirs.path().join("images");
        let Plan::Pod(p) = Plan::of(&n.c, &from_containerd(&images, false)).unwrap() else {
            panic!("not a pod plan");
        };
        assert!(p.request.pod && p.request.leave_running && p.request.tcp_established);
        let (id, args) = p.containerd_wants.expect("containerd's member");
        assert_eq!((id.as_str(), args.image_path), ("c", images));
        assert!(args.leave_running, "exiting is ours, after publishing");
    }

    #[test]
    fn the_kubelet_s_request_for_a_post_copy_container_hands_containerd_the_images() {
        let n = node(serde_json::json!({
            criu_shim_config::ANNOTATION_CHECKPOINT_TO: "job",
            criu_shim_config::ANNOTATION_MIGRATION: "post-copy",
        }));
        let images = n.dirs.path().join("images");
        let Plan::PostCopy(p) = Plan::of(&n.c, &from_containerd(&images, false)).unwrap() else {
            panic!("not a post-copy plan");
        };
        assert!(p.request.post_copy && !p.request.leave_running);
        assert_eq!(p.asked.handover.as_deref(), Some(images.as_path()));
        assert!(p.asked.progress.is_none() && p.report_dir.is_none());
        assert_eq!(p.to.name, "job");
    }

    #[test]
    fn the_cli_s_requests_report_to_its_directory() {
        let n = node(serde_json::json!({}));
        let dir = n.dirs.path().join("cli");
        let r = CheckpointRequest {
            to: Some("job".into()),
            ..Default::default()
        };
        let Plan::Container(p) = Plan::of(&n.c, &from_cli(&dir, &r)).unwrap() else {
            panic!("not a container plan");
        };
        assert!(p.from_cli && p.exit_after && p.handover.is_none());
        assert_eq!(p.report_dir.as_deref(), Some(dir.as_path()));
        assert!(images_are_staging(&n.c, &p.args));
        let moving = CheckpointRequest {
            post_copy: true,
            ..r.clone()
        };
        let Plan::PostCopy(p) = Plan::of(&n.c, &from_cli(&dir, &moving)).unwrap() else {
            panic!("not a post-copy plan");
        };
        assert_eq!(p.asked.progress.as_deref(), Some(dir.as_path()));
        assert!(p.asked.handover.is_none());
    }

    #[test]
    fn plans_that_cannot_run_are_refused_before_anything_is_frozen() {
        let n = node(serde_json::json!({}));
        let dir = n.dirs.path().join("cli");
        let both = CheckpointRequest {
            to: Some("job".into()),
            pod: true,
            post_copy: true,
            ..Default::default()
        };
        let err = Plan::of(&n.c, &from_cli(&dir, &both)).err().unwrap();
        assert!(err.to_string().contains("cold"), "{err}");
        let nowhere = CheckpointRequest::default();
        let err = Plan::of(&n.c, &from_cli(&dir, &nowhere)).err().unwrap();
        assert!(err.to_string().contains("--to"), "{err}");
        let escaping = CheckpointRequest {
            to: Some("../other-tenant/job".into()),
            ..Default::default()
        };
        assert!(Plan::of(&n.c, &from_cli(&dir, &escaping)).is_err());
        assert_eq!(
            std::fs::read_dir(&n.c.config.staging_dir).unwrap().count(),
            0,
            "a refused plan stages nothing"
        );
    }

    #[test]
    fn requests_from_older_clis_still_parse() {
        // `pod` came later: a request without it is a container checkpoint.
        let r: CheckpointRequest = serde_json::from_str(
            r#"{"to":"job","leave_running":false,"tcp_established":false,
                "file_locks":false,"ext_unix_sk":false,"compression_level":null}"#,
        )
        .unwrap();
        assert!(!r.pod);
        // No level: the node's setting decides (adaptive by default).
        assert!(matches!(
            r.compression(CompressionSetting::Auto),
            Compression::Adaptive { level: 1, .. }
        ));
        assert_eq!(r.compression(CompressionSetting::None), Compression::None);
        let none = CheckpointRequest {
            compression_level: Some(0),
            ..Default::default()
        };
        assert_eq!(
            none.compression(CompressionSetting::Auto),
            Compression::None
        );
        let small = CheckpointRequest {
            compression_level: Some(9),
            ..Default::default()
        };
        assert!(matches!(
            small.compression(CompressionSetting::None),
            Compression::Zstd { level: 9, .. }
        ));
    }
}
