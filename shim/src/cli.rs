//! The operators' CLI: subcommands of the shim binary.
//!
//!   containerd-shim-criu-v2 checkpoint [--namespace NS] [--state DIR] [--to NAME]
//!                                      [--leave-running] [--tcp-established] [--level N]
//!                                      [--pod] ID
//!   containerd-shim-criu-v2 inspect [--share DIR] ARCHIVE
//!   containerd-shim-criu-v2 list    [--share DIR] [KEY]
//!   containerd-shim-criu-v2 gc      [--share DIR] --keep N [KEY]
//!
//! `checkpoint` talks to the container's shim directly over its ttrpc socket
//! (found in the task's bundle), so the images go straight from CRIU to the
//! share, without a copy through containerd's content store.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 bad usage.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim::shim_ttrpc::TaskClient;
use containerd_shim::protos::ttrpc;

use crate::checkpoint::{CheckpointRequest, CHECKPOINT_REQUEST_TYPE, REPORT_FILE};
use crate::migrate::share::{self, Share};
use crate::migrate::{self, manifest::Manifest, unpack};

pub const COMMANDS: [&str; 4] = ["checkpoint", "inspect", "list", "gc"];

const USAGE: &str = "usage:
  containerd-shim-criu-v2 checkpoint [--namespace NS] [--state DIR] [--to NAME] [--leave-running] [--tcp-established] [--level N] [--pod] ID
  containerd-shim-criu-v2 inspect [--share DIR] ARCHIVE
  containerd-shim-criu-v2 list [--share DIR] [KEY]
  containerd-shim-criu-v2 gc [--share DIR] --keep N [KEY]";

struct Args {
    flags: Vec<(String, Option<String>)>,
    positional: Vec<String>,
}

impl Args {
    /// `--name value` pairs for `valued` flags, bare `--name` otherwise.
    fn parse(raw: &[String], valued: &[&str]) -> Result<Args, String> {
        let mut flags = Vec::new();
        let mut positional = Vec::new();
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if valued.contains(&name) {
                    let v = it.next().ok_or(format!("--{name} needs a value"))?;
                    flags.push((name.to_string(), Some(v.clone())));
                } else {
                    flags.push((name.to_string(), None));
                }
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Args { flags, positional })
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
    }
}

pub fn main(args: &[String]) -> ! {
    let cmd = args[1].as_str();
    let rest = &args[2..];
    let result = match cmd {
        "checkpoint" => checkpoint(rest),
        "inspect" => inspect(rest),
        "list" => list(rest),
        "gc" => gc(rest),
        _ => Err(Failure::Usage(String::new())),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(Failure::Usage(msg)) => {
            if !msg.is_empty() {
                eprintln!("{msg}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2)
        }
        Err(Failure::Failed(msg)) => {
            eprintln!("{cmd}: {msg}");
            std::process::exit(1)
        }
    }
}

enum Failure {
    Usage(String),
    Failed(String),
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

fn failed(msg: impl std::fmt::Display) -> Failure {
    Failure::Failed(msg.to_string())
}

fn share_dir(a: &Args) -> PathBuf {
    a.value("share")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os(criu_shim_config::env::SHARE_DIR).map(PathBuf::from))
        .unwrap_or_else(|| criu_shim_config::ShimConfig::defaults("default").share_dir)
}

fn checkpoint(raw: &[String]) -> Result<(), Failure> {
    let a = Args::parse(raw, &["namespace", "state", "to", "level"]).map_err(usage)?;
    let [id] = a.positional.as_slice() else {
        return Err(usage("checkpoint takes one container id"));
    };
    let ns = a.value("namespace").unwrap_or("default");
    let state = a.value("state").unwrap_or("/run/containerd");
    let bundle = Path::new(state)
        .join("io.containerd.runtime.v2.task")
        .join(ns)
        .join(id);
    let address = shim_address(&bundle).map_err(|e| {
        failed(format!(
            "no running task {id} in namespace {ns} ({}: {e}); check --namespace and --state",
            bundle.display()
        ))
    })?;
    let level = match a.value("level") {
        Some(v) => Some(
            v.parse::<i32>()
                .map_err(|_| usage("--level takes a number"))?,
        ),
        None => None,
    };
    let request = CheckpointRequest {
        to: a.value("to").map(str::to_string),
        leave_running: a.has("leave-running"),
        tcp_established: a.has("tcp-established"),
        pod: a.has("pod"),
        compression_level: level,
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
    let progress = Progress::start(format!("checkpointing {id}"));
    let result = tasks.checkpoint(ttrpc::context::with_timeout(0), &req);
    drop(progress);
    if let Err(e) = result {
        return Err(failed(rpc_message(e)));
    }
    let report: serde_json::Value = std::fs::read_to_string(report_dir.path().join(REPORT_FILE))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    match report["summary"].as_str() {
        Some(s) => println!("{id}: {s}"),
        None => println!(
            "{id}: checkpointed in {:.2} s",
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(())
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

fn rpc_message(e: ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message().to_string(),
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

fn inspect(raw: &[String]) -> Result<(), Failure> {
    let a = Args::parse(raw, &["share"]).map_err(usage)?;
    let [name] = a.positional.as_slice() else {
        return Err(usage("inspect takes one archive"));
    };
    let (path, file, size) = open_archive(&share_dir(&a), name)?;
    let scratch = tempfile::tempdir().map_err(failed)?;
    let what = path.display().to_string();
    let progress = Progress::start(format!("verifying {what}"));
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
    print_manifest(&path, size, &m);
    println!(
        "verification: OK ({} members, all SHA-256 digests match{})",
        m.members.len(),
        if key.is_some() {
            ", signed with the cluster's key"
        } else {
            ""
        }
    );
    Ok(())
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

fn list(raw: &[String]) -> Result<(), Failure> {
    let a = Args::parse(raw, &["share"]).map_err(usage)?;
    let share = Share::open(&share_dir(&a)).map_err(failed)?;
    for key in keys(&share, a.positional.first().map(String::as_str))? {
        let Some(dir) = share.dir(&key).map_err(failed)? else {
            continue;
        };
        for name in share::list(&dir).map_err(failed)? {
            let size = dir.stat(&name).map(|s| s.size).unwrap_or(0);
            println!(
                "{:>10.1} MiB  {key}/{name}",
                size as f64 / (1024.0 * 1024.0)
            );
        }
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

fn gc(raw: &[String]) -> Result<(), Failure> {
    let a = Args::parse(raw, &["share", "keep"]).map_err(usage)?;
    let keep: usize = a
        .value("keep")
        .ok_or_else(|| usage("gc needs --keep N"))?
        .parse()
        .map_err(|_| usage("--keep takes a number"))?;
    let share = Share::open(&share_dir(&a)).map_err(failed)?;
    let mut removed = 0;
    for key in keys(&share, a.positional.first().map(String::as_str))? {
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

/// "working... 12 s" on stderr every few seconds for long operations.
struct Progress {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Progress {
    fn start(what: String) -> Progress {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut next = Duration::from_secs(2);
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if started.elapsed() >= next && !flag.load(Ordering::SeqCst) {
                    eprintln!("{what}... {} s", started.elapsed().as_secs());
                    next += Duration::from_secs(2);
                }
            }
        });
        Progress { stop }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
