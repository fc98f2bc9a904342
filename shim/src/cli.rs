//! The operators' CLI: subcommands of the shim binary (`checkpoint`,
//! `inspect`, `list`, `gc`, `version`; `--help` on each), parsed with clap.
//! containerd's own flags (`-namespace`, `-address`, `start`, `delete`,
//! ...) never reach it: `main` sends only [`COMMANDS`] here.
//!
//! `checkpoint` talks to the container's shim directly over its ttrpc socket
//! (found in the task's bundle), so the images go straight from CRIU to the
//! share, without a copy through containerd's content store.
//!
//! Exit codes: 0 success (and help), 1 the operation failed, 2 bad usage.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim::shim_ttrpc::TaskClient;
use containerd_shim::protos::ttrpc;

use clap::{Args, Parser, Subcommand};

use crate::messages::{CheckpointReport, CheckpointRequest, FileMessage, CHECKPOINT_REQUEST_TYPE};
use crate::migrate::share::{self, Share};
use crate::migrate::{self, manifest::Manifest, unpack};

/// Subcommands, and the words that ask for help or the version: these go
/// to this CLI; everything else is containerd's shim protocol.
pub const COMMANDS: [&str; 10] = [
    "checkpoint",
    "inspect",
    "list",
    "gc",
    "help",
    "-h",
    "--help",
    "-V",
    "--version",
    "version",
];

/// Checkpoint running containers to a shared file system and inspect what
/// is there. (containerd runs this same binary as its runtime shim,
/// `io.containerd.criu.v2`; these subcommands are for operators.)
#[derive(Debug, Parser)]
#[command(name = "containerd-shim-criu-v2", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checkpoint a running container (or its whole pod) to the share.
    ///
    /// The images go from CRIU straight to the share, without a copy through
    /// containerd. Without --leave-running the container stops, but only once
    /// its archive is safely published; if anything fails it keeps running.
    Checkpoint(CheckpointArgs),
    /// Show an archive's manifest and verify it completely (digests, and the
    /// signature with CRIU_SHIM_ARCHIVE_KEY_FILE).
    Inspect {
        #[command(flatten)]
        share: ShareArg,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
        /// An archive file, or a name on the share as `list` prints it
        /// (a key means its newest archive).
        archive: String,
    },
    /// List the archives on the share (pods' per-container ones included).
    List {
        #[command(flatten)]
        share: ShareArg,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
        /// Only this key (a directory on the share, such as k8s-default/job).
        key: Option<String>,
    },
    /// Remove all but the newest N archives of each key, and what publishers
    /// that died mid-write left behind.
    Gc {
        #[command(flatten)]
        share: ShareArg,
        /// How many archives to keep per key.
        #[arg(long, value_name = "N")]
        keep: usize,
        /// Only this key.
        key: Option<String>,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Args)]
struct ShareArg {
    /// Where the share is mounted.
    #[arg(
        long = "share",
        value_name = "DIR",
        env = "CRIU_SHIM_SHARE_DIR",
        default_value = "/var/lib/criu-shim/share"
    )]
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct CheckpointArgs {
    /// The containerd namespace of the container (k8s.io for Kubernetes);
    /// found by itself when only one namespace has the container.
    #[arg(long)]
    namespace: Option<String>,
    /// containerd's state directory.
    #[arg(long, value_name = "DIR", default_value = "/run/containerd")]
    state: PathBuf,
    /// Key or archive name on the share (default: the container's
    /// criu-shim.io/checkpoint-to annotation). Resolved inside the
    /// container's namespace's part of the share.
    #[arg(long, value_name = "KEY")]
    to: Option<String>,
    /// Keep the container running after the checkpoint.
    #[arg(long)]
    leave_running: bool,
    /// Checkpoint established TCP connections.
    #[arg(long)]
    tcp_established: bool,
    /// zstd level (0: no compression).
    #[arg(long, value_name = "N")]
    level: Option<i32>,
    /// Every container of the container's pod, frozen together, published
    /// all or none.
    #[arg(long)]
    pod: bool,
    /// Post-copy: publish everything but the memory and return at once;
    /// the container stays frozen here and serves its memory to the node
    /// that restores it, then exits (or, if that node never comes or
    /// goes away, runs on). Needs the cluster key and
    /// CRIU_SHIM_POST_COPY_ADDRESS on this node.
    #[arg(long, conflicts_with_all = ["pod", "leave_running"])]
    post_copy: bool,
    /// With --post-copy: stay until the memory has moved (showing pages
    /// moved, left and the rate), exit 0 once the source has exited, 1 if
    /// the transfer was called off (the source then runs on).
    #[arg(long, requires = "post_copy")]
    wait: bool,
    /// Print the report as JSON (for scripts) instead of text.
    #[arg(long)]
    json: bool,
    /// The container: its id, a unique prefix of it (what `crictl ps`
    /// prints), or `containerd://ID`. With --pod also `NAMESPACE/POD`, the
    /// Kubernetes pod's namespace and name.
    id: String,
}

pub fn main(args: &[String]) -> ! {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        // Help and version print and exit 0; usage errors exit 2.
        Err(e) => e.exit(),
    };
    let (name, result) = match cli.command {
        Command::Checkpoint(a) => ("checkpoint", checkpoint(a)),
        Command::Inspect {
            share,
            json,
            archive,
        } => ("inspect", inspect(&share.dir, &archive, json)),
        Command::List { share, json, key } => ("list", list(&share.dir, key.as_deref(), json)),
        Command::Gc { share, keep, key } => ("gc", gc(&share.dir, keep, key.as_deref())),
        Command::Version => {
            println!("containerd-shim-criu-v2 {}", env!("CARGO_PKG_VERSION"));
            ("version", Ok(()))
        }
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(Failure(msg)) => {
            eprintln!("{name}: {msg}");
            std::process::exit(1)
        }
    }
}

/// Why a command failed, for stderr (exit code 1).
struct Failure(String);

fn failed(msg: impl std::fmt::Display) -> Failure {
    Failure(msg.to_string())
}

fn checkpoint(a: CheckpointArgs) -> Result<(), Failure> {
    let (ns, id) = target(&a)?;
    let (id, ns) = (&id, &ns);
    let bundle = a
        .state
        .join("io.containerd.runtime.v2.task")
        .join(ns)
        .join(id);
    let address = shim_address(&bundle).map_err(|e| {
        failed(format!(
            "no running task {id} in namespace {ns} ({}: {e}); check --namespace and --state",
            bundle.display()
        ))
    })?;
    let request = CheckpointRequest {
        to: a.to.clone(),
        leave_running: a.leave_running,
        tcp_established: a.tcp_established,
        pod: a.pod,
        post_copy: a.post_copy,
        compression_level: a.level,
        ..Default::default()
    };
    let report_dir = tempfile::tempdir().map_err(failed)?;
    let req = containerd_shim::protos::api::CheckpointTaskRequest {
        id: id.clone(),
        path: report_dir.path().to_string_lossy().into_owned(),
        options: MessageField::some(Any {
            type_url: CHECKPOINT_REQUEST_TYPE.into(),
            value: serde_json::to_vec(&request).expect("serializes"),
            ..Default::default()
        }),
        ..Default::default()
    };
    let client = ttrpc::Client::connect(address.trim())
        .map_err(|e| failed(format!("connect to the shim at {}: {e}", address.trim())))?;
    let tasks = TaskClient::new(client);
    let started = Instant::now();
    let progress = (!a.json).then(|| {
        Progress::watching(
            format!("checkpointing {id}"),
            Some(report_dir.path().into()),
        )
    });
    let result = tasks.checkpoint(ttrpc::context::with_timeout(0), &req);
    drop(progress);
    if let Err(e) = result {
        return Err(failed(rpc_message(e)));
    }
    let report = CheckpointReport::read(report_dir.path());
    match report {
        Some(r) if a.json => println!("{}", serde_json::to_string_pretty(&r).map_err(failed)?),
        Some(r) => println!("{id}: {}", r.summary),
        None => println!(
            "{id}: checkpointed in {:.2} s",
            started.elapsed().as_secs_f64()
        ),
    }
    if !a.post_copy {
        return Ok(());
    }
    if !a.wait {
        if !a.json {
            println!(
                "{id}: frozen here, serving its memory to the node that restores it; it exits \
                 once every page has moved (--wait to follow)"
            );
        }
        return Ok(());
    }
    wait_for_post_copy(id, report_dir.path(), address.trim(), a.json)
}

/// Until the relay writes how the transfer ended (or its shim, at
/// `address`, is gone).
fn wait_for_post_copy(id: &str, dir: &Path, address: &str, json: bool) -> Result<(), Failure> {
    use crate::messages::{FileMessage, PostCopyEnd};
    let progress = (!json).then(|| Progress::watching(format!("moving {id}"), Some(dir.into())));
    let socket = address.strip_prefix("unix://").unwrap_or(address);
    let mut looked = Instant::now();
    let end = loop {
        if let Some(end) = PostCopyEnd::read(dir) {
            break end;
        }
        if looked.elapsed() > Duration::from_secs(2) {
            looked = Instant::now();
            if std::os::unix::net::UnixStream::connect(socket).is_err() {
                return Err(failed(format!(
                    "{id}: its shim went away while the memory moved (see containerd's log)"
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(progress);
    if json {
        println!("{}", serde_json::to_string_pretty(&end).map_err(failed)?);
    }
    match (end.moved, end.why) {
        (true, _) => {
            if !json {
                println!(
                    "{id}: {:.1} MiB of memory moved in {:.2} s; the source has exited",
                    end.bytes as f64 / (1 << 20) as f64,
                    end.seconds
                );
            }
            Ok(())
        }
        (false, why) => Err(failed(format!(
            "{id}: the transfer was called off ({}); the source runs on here",
            why.unwrap_or_default()
        ))),
    }
}

/// The (containerd namespace, container id) the operator means: an id, a
/// unique prefix of one, `containerd://ID`, or (with --pod)
/// `NAMESPACE/POD`, looked up in the tasks' bundles under --state.
fn target(a: &CheckpointArgs) -> Result<(String, String), Failure> {
    let tasks = a.state.join("io.containerd.runtime.v2.task");
    let wanted = a.id.strip_prefix("containerd://").unwrap_or(&a.id);
    let pod = a
        .pod
        .then(|| wanted.split_once('/'))
        .flatten()
        .map(|(ns, name)| (ns.to_string(), name.to_string()));
    let mut found = Vec::new();
    let namespaces: Vec<String> = match &a.namespace {
        Some(ns) => vec![ns.clone()],
        None => names_in(&tasks),
    };
    for ns in &namespaces {
        for id in names_in(&tasks.join(ns)) {
            let hit = match &pod {
                Some((pod_ns, pod_name)) => {
                    let spec = crate::spec::Spec::read(&tasks.join(ns).join(&id));
                    !spec.is_pod_sandbox()
                        && spec.annotation(criu_shim_config::ANNOTATION_SANDBOX_NAMESPACE)
                            == Some(pod_ns.as_str())
                        && spec.annotation(criu_shim_config::ANNOTATION_SANDBOX_NAME)
                            == Some(pod_name.as_str())
                }
                None => id == wanted,
            };
            if hit {
                found.push((ns.clone(), id));
            }
        }
    }
    if found.is_empty() && pod.is_none() {
        // Not an exact id: a unique prefix (crictl prints 13 characters).
        for ns in &namespaces {
            for id in names_in(&tasks.join(ns)) {
                if id.starts_with(wanted) {
                    found.push((ns.clone(), id));
                }
            }
        }
    }
    match (found.len(), pod.is_some()) {
        (0, _) => Err(failed(format!(
            "no running task {wanted} in {} under {}; check the id, --namespace and --state",
            match &a.namespace {
                Some(ns) => format!("namespace {ns}"),
                None => "any namespace".into(),
            },
            tasks.display()
        ))),
        (1, _) | (_, true) => Ok(found.swap_remove(0)),
        _ => Err(failed(format!(
            "{wanted} is ambiguous: {}; give more of the id or --namespace",
            found
                .iter()
                .map(|(ns, id)| format!("{ns}/{id}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Directory names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The shim's ttrpc address: containerd 2.x keeps it in bootstrap.json,
/// older versions in a file named `address`.
fn shim_address(bundle: &Path) -> std::io::Result<String> {
    if let Ok(text) = std::fs::read_to_string(bundle.join("bootstrap.json")) {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if let Some(a) = v["address"].as_str() {
            return Ok(a.to_string());
        }
    }
    std::fs::read_to_string(bundle.join("address")).map(|s| s.trim().to_string())
}

/// The shim's message, and its error class unless it has none (scripts
/// can tell a CRIU deadline, `DEADLINE_EXCEEDED`, from a refusal).
fn rpc_message(e: ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => match s.code() {
            ttrpc::Code::UNKNOWN | ttrpc::Code::OK => s.message().to_string(),
            code => format!("{} [{code:?}]", s.message()),
        },
        other => other.to_string(),
    }
}

/// An archive the operator names: a file on this machine, or a name on
/// the share (as `list` prints it).
fn open_archive(share: &Path, name: &str) -> Result<(PathBuf, std::fs::File, u64), Failure> {
    let p = Path::new(name);
    if p.is_absolute() || p.exists() {
        let f = std::fs::File::open(p).map_err(|e| failed(format!("open {name}: {e}")))?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        return Ok((p.to_path_buf(), f, size));
    }
    let archive = Share::open(share)
        .and_then(|s| s.resolve(name))
        .map_err(failed)?;
    let (f, size) = archive.open().map_err(failed)?;
    Ok((archive.path(), f, size))
}

/// What `inspect` found, for `--json`.
#[derive(serde::Serialize)]
struct InspectReport<'a> {
    archive: &'a Path,
    size: u64,
    /// Every digest matched (and the signature, with a key).
    verified: bool,
    signed_with_cluster_key: bool,
    manifest: &'a Manifest,
    processes: Vec<ProcessReport>,
}

/// One process of the archive, as CRIU will restore it.
#[derive(serde::Serialize)]
struct ProcessReport {
    pid: u32,
    ppid: u32,
    threads: usize,
    command: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    effective_capabilities: Option<String>,
    no_new_privs: Option<bool>,
    seccomp: String,
}

fn inspect(share: &Path, name: &str, json: bool) -> Result<(), Failure> {
    let (path, file, size) = open_archive(share, name)?;
    let scratch = tempfile::tempdir().map_err(failed)?;
    let what = path.display().to_string();
    let progress = (!json).then(|| Progress::start(format!("verifying {what}")));
    let key_file = std::env::var_os(criu_shim_config::env::ARCHIVE_KEY_FILE).map(PathBuf::from);
    let key = migrate::mac::configured(key_file.as_deref()).map_err(failed)?;
    let config = criu_shim_config::ShimConfig::from_env("default", None).map_err(failed)?;
    let options = unpack::Options {
        key: key.as_deref(),
        limits: unpack::Limits::from_config(&config),
        ..Default::default()
    };
    let unpacked = unpack::unpack(file, scratch.path(), &what, &options);
    drop(progress);
    let m = unpacked.map_err(failed)?;
    let processes = processes(&scratch.path().join(migrate::members::IMAGES_DIR));
    if json {
        let report = InspectReport {
            archive: &path,
            size,
            verified: true,
            signed_with_cluster_key: key.is_some(),
            manifest: &m,
            processes,
        };
        println!("{}", serde_json::to_string_pretty(&report).map_err(failed)?);
        return Ok(());
    }
    print_manifest(&path, size, &m);
    print_processes(&processes);
    println!(
        "verification: OK ({} members, {}{})",
        m.members.len(),
        what_was_checked(&m),
        if key.is_some() {
            ", signed with the cluster's key"
        } else {
            ""
        }
    );
    Ok(())
}

/// Which digests covered the archive (they differ by format).
fn what_was_checked(m: &migrate::manifest::Manifest) -> String {
    use migrate::manifest::FrameDigest;
    let frames = match FrameDigest::of_version(m.version) {
        FrameDigest::Blake3 => "BLAKE3",
        FrameDigest::Sha256 => "SHA-256",
    };
    let own = m.members.iter().filter(|x| x.sha256.is_some()).count();
    match (m.frames.len(), own) {
        (0, _) => "every member's SHA-256 matches".into(),
        (n, 0) => format!("all {n} frames' {frames} digests match"),
        (n, _) => format!("all {n} frames' {frames} digests and every member's SHA-256 match"),
    }
}

/// The archive's processes, as its images say (empty if unreadable).
fn processes(images: &Path) -> Vec<ProcessReport> {
    let tree = criu_sys::images::process_tree(images).unwrap_or_default();
    let threads = criu_sys::images::threads(images).unwrap_or_default();
    tree.iter()
        .map(|p| {
            let main = threads.iter().find(|t| t.tid == p.pid);
            let creds = main.and_then(|t| t.creds.as_ref());
            ProcessReport {
                pid: p.pid,
                ppid: p.ppid,
                threads: p.threads.len(),
                command: main.and_then(|t| t.comm.clone()),
                uid: creds.map(|c| c.uids[0]),
                gid: creds.map(|c| c.gids[0]),
                effective_capabilities: creds
                    .map(|c| crate::restore::privileges::names(c.effective)),
                no_new_privs: creds.map(|c| c.no_new_privs),
                seccomp: main
                    .map(|t| format!("{:?}", t.seccomp).to_lowercase())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

fn print_processes(processes: &[ProcessReport]) {
    let threads: usize = processes.iter().map(|p| p.threads).sum();
    println!("processes:    {} ({threads} threads)", processes.len());
    for p in processes {
        let depth = ancestors(processes, p);
        println!(
            "  {}{} {}  uid {}, seccomp {}, {} effective capabilities",
            "  ".repeat(depth),
            p.pid,
            p.command.as_deref().unwrap_or("?"),
            p.uid.map_or("?".into(), |u| u.to_string()),
            p.seccomp,
            p.effective_capabilities
                .as_deref()
                .map_or(0, |c| c.split(", ").filter(|s| !s.is_empty()).count()),
        );
    }
}

/// How deep `p` is in the tree (0 for the root).
fn ancestors(all: &[ProcessReport], p: &ProcessReport) -> usize {
    let mut depth = 0;
    let mut ppid = p.ppid;
    while let Some(parent) = all.iter().find(|q| q.pid == ppid) {
        depth += 1;
        ppid = parent.ppid;
        if depth > all.len() {
            break;
        }
    }
    depth
}

fn print_manifest(path: &Path, size: u64, m: &Manifest) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("archive:      {}", path.display());
    println!(
        "size:         {:.1} MiB ({} compression)",
        mib(size),
        m.compression
    );
    println!("container:    {}", m.container_id);
    println!(
        "tenant:       {}",
        m.tenant.as_deref().unwrap_or("(none recorded)")
    );
    println!("created:      {} (unix)", m.created);
    println!(
        "criu:         {}   kernel: {}   shim: {}",
        m.criu_version, m.kernel, m.shim_version
    );
    println!(
        "content:      {:.1} MiB, pages {:.1} MiB",
        mib(m.total_size()),
        mib(m.stats.pages_bytes)
    );
    println!(
        "tcp:          {}",
        if m.tcp_established {
            "established connections kept"
        } else {
            "not kept"
        }
    );
    if let Some(f) = m.stats.frozen_ms {
        println!(
            "frozen:       {f:.0} ms (CRIU {:.0} ms)",
            m.stats.criu_ms.unwrap_or(0.0)
        );
    }
}

/// One archive, for `list --json`.
#[derive(serde::Serialize)]
struct Listed {
    name: String,
    bytes: u64,
}

fn list(share: &Path, key: Option<&str>, json: bool) -> Result<(), Failure> {
    let share = Share::open(share).map_err(failed)?;
    let mut listed = Vec::new();
    for key in keys(&share, key)? {
        let Some(dir) = share.dir(&key).map_err(failed)? else {
            continue;
        };
        for name in share::list(&dir).map_err(failed)? {
            let bytes = dir.stat(&name).map(|s| s.size).unwrap_or(0);
            listed.push(Listed {
                name: format!("{key}/{name}"),
                bytes,
            });
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&listed).map_err(failed)?);
        return Ok(());
    }
    for l in listed {
        println!(
            "{:>10.1} MiB  {}",
            l.bytes as f64 / (1024.0 * 1024.0),
            l.name
        );
    }
    Ok(())
}

/// The keys (directories holding archives, pods' per-container ones
/// included, tenants' parts included) to look at: one given, or all.
fn keys(share: &Share, key: Option<&str>) -> Result<Vec<String>, Failure> {
    match key {
        Some(k) => {
            share::check_name(k).map_err(failed)?;
            let mut under: Vec<String> = match share.dir(k).map_err(failed)? {
                Some(dir) => Share::from_dir(dir).keys().map_err(failed)?,
                None => Vec::new(),
            }
            .into_iter()
            .map(|sub| format!("{k}/{sub}"))
            .collect();
            under.insert(0, k.to_string());
            Ok(under)
        }
        None => share.keys().map_err(failed),
    }
}

fn gc(share: &Path, keep: usize, key: Option<&str>) -> Result<(), Failure> {
    let share = Share::open(share).map_err(failed)?;
    let mut removed = 0;
    for key in keys(&share, key)? {
        let Some(dir) = share.dir(&key).map_err(failed)? else {
            continue;
        };
        let archives = share::list(&dir).map_err(failed)?;
        let old = archives.len().saturating_sub(keep);
        for name in &archives[..old] {
            dir.remove(name)
                .map_err(|e| failed(format!("remove {key}/{name}: {e}")))?;
            println!("removed {key}/{name}");
            removed += 1;
        }
        // Sequence markers of removed archives (the newest one stays).
        for m in migrate::sequence::orphans(&dir) {
            let _ = dir.remove(&m);
        }
        // Leftovers of publishers that died mid-write, after an hour.
        for (name, _) in dir.entries().map_err(failed)? {
            let stale = dir
                .stat(&name)
                .map(|s| s.modified.elapsed().unwrap_or_default() > Duration::from_secs(3600))
                .unwrap_or(false);
            if share::is_leftover(&name) && stale {
                let _ = dir.remove(&name);
                println!("removed stale {key}/{name}");
                removed += 1;
            }
        }
    }
    println!("{removed} removed");
    Ok(())
}

/// Progress on stderr for long operations, on a terminal (or with
/// `CRIU_SHIM_PROGRESS=1`): every second, what the shim reports in
/// `dir` (bytes, rate, ETA) or, without reports, the time so far.
struct Progress {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Progress {
    fn start(what: String) -> Progress {
        Self::watching(what, None)
    }

    fn watching(what: String, dir: Option<PathBuf>) -> Progress {
        use std::io::IsTerminal;
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let wanted = std::io::stderr().is_terminal()
            || std::env::var("CRIU_SHIM_PROGRESS").is_ok_and(|v| v == "1");
        if !wanted {
            return Progress { stop };
        }
        let flag = stop.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut last: Option<(Instant, u64)> = None;
            let mut next = Duration::from_secs(1);
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if started.elapsed() < next || flag.load(Ordering::SeqCst) {
                    continue;
                }
                next += Duration::from_secs(1);
                let report = dir
                    .as_deref()
                    .and_then(crate::messages::ProgressReport::read);
                match report {
                    Some(r) => {
                        let now = Instant::now();
                        let rate =
                            last.filter(|(_, done)| r.done_bytes >= *done)
                                .map(|(t, done)| {
                                    (r.done_bytes - done) as f64
                                        / now.duration_since(t).as_secs_f64()
                                });
                        last = Some((now, r.done_bytes));
                        eprintln!("{what}: {}", progress_line(&r, rate));
                    }
                    None => eprintln!("{what}... {} s", started.elapsed().as_secs()),
                }
            }
        });
        Progress { stop }
    }
}

/// `publish: 812.0 of 2048.0 MiB (410 MiB/s, ETA 3 s)`.
fn progress_line(r: &crate::messages::ProgressReport, rate: Option<f64>) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let rate_mib = rate.map(|r| r / (1024.0 * 1024.0));
    match r.total_bytes {
        Some(total) => {
            let left = total.saturating_sub(r.done_bytes) as f64;
            let eta = rate.filter(|v| *v > 0.0).map(|v| (left / v).ceil());
            format!(
                "{} {:.1} of {:.1} MiB{}",
                r.phase,
                mib(r.done_bytes),
                mib(total),
                match (rate_mib, eta) {
                    (Some(m), Some(e)) => format!(" ({m:.0} MiB/s, ETA {e:.0} s)"),
                    _ => String::new(),
                }
            )
        }
        None => format!(
            "{} {:.1} MiB{}",
            r.phase,
            mib(r.done_bytes),
            rate_mib
                .map(|m| format!(" ({m:.0} MiB/s)"))
                .unwrap_or_default()
        ),
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{FileMessage, ProgressReport};

    #[test]
    fn progress_lines_say_bytes_rate_and_eta() {
        let r = ProgressReport {
            phase: "publish".into(),
            done_bytes: 512 << 20,
            total_bytes: Some(2048 << 20),
        };
        assert_eq!(
            progress_line(&r, Some((256u64 << 20) as f64)),
            "publish 512.0 of 2048.0 MiB (256 MiB/s, ETA 6 s)"
        );
        let d = ProgressReport {
            phase: "dump".into(),
            done_bytes: 64 << 20,
            total_bytes: None,
        };
        assert_eq!(progress_line(&d, None), "dump 64.0 MiB");
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path()).unwrap();
        assert_eq!(ProgressReport::read(dir.path()), Some(r));
    }
}
