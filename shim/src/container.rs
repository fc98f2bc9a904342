//! A container: its bundle, rootfs mount, init process and execs, and the
//! runc calls that act on them. The Task service translates RPCs into these
//! methods; nothing here knows about ttrpc.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::messages::{FailureKind, FileMessage, FrontFailure, FrontStats};
use crate::process::{Process, Status};
use crate::restore::lazy::{LazyRestore, OnFailure};
use crate::runc::{CriuArgs, Runtime, SpawnOpts};
use crate::stdio::{ConsoleSocket, ProcessIo, StdioPaths};

/// A rootfs mount containerd asks us to make at `<bundle>/rootfs`.
#[derive(Debug, Clone)]
pub struct Mount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

pub struct CreateOpts {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<Mount>,
    pub stdio: StdioPaths,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
    /// Restore from these CRIU images instead of starting fresh.
    pub restore: Option<CriuArgs>,
    /// A staged checkpoint whose writable-layer changes are applied to the
    /// rootfs before the restore.
    pub rootfs_changes: Option<PathBuf>,
    /// A lazy restore's pages (`restore.lazy_pages`).
    pub lazy_pages: Option<Box<dyn crate::restore::lazy::PageSource>>,
    /// Create returns once every one of those pages is in place (a cold
    /// restore through userfaultfd).
    pub pages_before_start: bool,
    /// When containerd gives up on the Create (its request's deadline).
    pub deadline: Option<std::time::Instant>,
    pub config: criu_shim_config::ShimConfig,
}

/// What a checkpoint measured (from the CRIU front).
#[derive(Debug, Clone, Default)]
pub struct DumpStats {
    pub criu_ms: Option<f64>,
    pub frozen_ms: Option<f64>,
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    runc: Arc<dyn Runtime>,
    rootfs_mounted: bool,
    no_new_keyring: bool,
    /// Restored with its tasks stopped: Start resumes them.
    restored: bool,
    /// Where the container's writes land (overlay upperdir), for checkpoints.
    pub upperdir: Option<PathBuf>,
    /// Kill and Delete of the container, one at a time (as containerd's Go
    /// shim does): containerd may send both at once, and a Delete that
    /// lets the shim exit must not cut off a Kill's answer.
    lifecycle: Mutex<()>,
    /// A checkpoint thawed it before containerd's Resume came (see
    /// `checkpoint::thaw_early`): that Resume has nothing left to do.
    pub thawed_early: std::sync::atomic::AtomicBool,
    /// Its memory is being served to another node (a post-copy
    /// checkpoint): the tasks stay frozen until the transfer ends, so
    /// pause, resume, update, exec and checkpoints are refused.
    pub moving_out: std::sync::atomic::AtomicBool,
    /// Serves the memory of a lazy restore until every page has moved.
    lazy: Mutex<Option<LazyRestore>>,
    pub config: criu_shim_config::ShimConfig,
}

impl Container {
    /// `runc create`: the init process exists, stopped before the user's
    /// program, until [`Container::start`].
    pub fn create(mut o: CreateOpts, runc: Arc<dyn Runtime>) -> Result<Container> {
        let rootfs = o.bundle.join("rootfs");
        let mounted = mount_rootfs(&o.rootfs, &rootfs)?;
        let init = Arc::new(Process::new("", o.stdio.clone(), None));
        let container = Container {
            id: o.id.clone(),
            bundle: o.bundle.clone(),
            init,
            execs: Mutex::new(HashMap::new()),
            runc,
            rootfs_mounted: mounted,
            no_new_keyring: o.no_new_keyring,
            restored: o.restore.is_some(),
            upperdir: o
                .rootfs
                .iter()
                .find_map(|m| crate::migrate::stage::upperdir(&m.options)),
            config: o.config.clone(),
            lifecycle: Mutex::new(()),
            thawed_early: Default::default(),
            moving_out: Default::default(),
            lazy: Mutex::new(None),
        };
        if let Some(staged) = &o.rootfs_changes {
            crate::migrate::rootfs::apply(staged, &rootfs)?;
        }
        // On failure `container` is dropped here and its Drop cleans up.
        let pid_file = o.bundle.join("init.pid");
        let console = o.stdio.terminal.then(ConsoleSocket::new).transpose()?;
        let console_path = console.as_ref().map(ConsoleSocket::path);
        let spawn = SpawnOpts {
            pid_file: &pid_file,
            console_socket: console_path.as_deref(),
            no_pivot: o.no_pivot,
            no_new_keyring: o.no_new_keyring,
        };
        // The lazy-pages daemon listens before CRIU looks for it.
        if let (Some(args), Some(pages)) = (&o.restore, o.lazy_pages.take()) {
            let lazy = LazyRestore::start(
                &o.id,
                &args.work_path,
                &args.image_path,
                pages,
                kill_on_failure(container.runc.clone(), &o.id),
            )?;
            *container.lazy.lock().unwrap() = Some(lazy);
        }
        // A restore makes the same runc container from images instead.
        let runc = &container.runc;
        let make = |stdio| match &o.restore {
            Some(args) => runc
                .restore(&o.id, &o.bundle, args, &spawn, stdio)
                .map_err(
                    |e| match &FrontStats::read(&args.work_path).unwrap_or_default().error {
                        // CRIU's own words beat runc's summary (and its log
                        // goes with the staging).
                        Some(f) => criu_failure(f, &format!("restore of {}", o.id)),
                        None => e,
                    },
                ),
            None => runc.create(&o.id, &o.bundle, &spawn, stdio),
        };
        match &console {
            Some(console) => {
                make(Default::default())?;
                let master = console.receive_master()?;
                container
                    .init
                    .set_io(ProcessIo::terminal(master, &o.stdio)?);
            }
            None => {
                let (child, io) = ProcessIo::pipes(&o.stdio)?;
                make(child)?;
                container.init.set_io(io);
            }
        }
        container.init.set_pid(read_pid(&pid_file)?);
        if let Some(lazy) = container.lazy.lock().unwrap().as_ref() {
            lazy.release()
                .map_err(|e| e.with_note(&format!("container {}", o.id)))?;
        }
        if o.pages_before_start {
            // No longer than containerd waits for this Create.
            let mut limit = std::time::Duration::from_secs(o.config.criu_timeout_secs);
            if let Some(d) = o.deadline {
                limit = limit.min(d.saturating_duration_since(std::time::Instant::now()));
            }
            container.memory_in_place(limit)?;
        }
        Ok(container)
    }

    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} not found in {}", self.id)))
    }

    pub fn start(&self) -> Result<i32> {
        if self.init.status() != Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not in the created state",
                self.id
            )));
        }
        if let Some(why) = self.lazy.lock().unwrap().as_ref().and_then(|l| l.failure()) {
            return Err(Error::FailedPrecondition(format!(
                "container {}: restoring its memory failed and its tasks were killed: {why}",
                self.id
            )));
        }
        if self.restored {
            // CRIU left the restored tasks stopped; let them run.
            self.runc.kill(&self.id, libc::SIGCONT as u32, true)?;
        } else {
            self.runc.start(&self.id)?;
        }
        self.init.set_status(Status::Running);
        Ok(self.init.pid())
    }

    /// A checkpoint needs the whole memory: a lazily restored container's
    /// pages must all be in place first (waited for, at most `timeout`).
    pub fn memory_in_place(&self, timeout: std::time::Duration) -> Result<()> {
        let mut lazy = self.lazy.lock().unwrap();
        if let Some(l) = lazy.as_ref() {
            l.wait(timeout)
                .map_err(|e| e.with_note(&format!("container {}", self.id)))?;
            *lazy = None;
        }
        Ok(())
    }

    /// `runc checkpoint` through the CRIU front. With `leave_running` the
    /// container goes on; without, its processes exit once dumped.
    pub fn checkpoint(&self, args: &CriuArgs, env: &[(&str, &str)]) -> Result<DumpStats> {
        if !matches!(self.init.status(), Status::Running | Status::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                self.id
            )));
        }
        self.memory_in_place(std::time::Duration::from_secs(
            self.config.criu_timeout_secs,
        ))?;
        std::fs::create_dir_all(&args.image_path)
            .and_then(|_| std::fs::create_dir_all(&args.work_path))
            .map_err(|e| Error::io("create checkpoint directories", e))?;
        let result = self.runc.checkpoint(&self.id, args, env);
        let stats = FrontStats::read(&args.work_path).unwrap_or_default();
        if let Err(e) = result {
            self.recover_after_failed_dump();
            // CRIU's own words beat runc's summary of them.
            return Err(match &stats.error {
                Some(f) => criu_failure(f, &format!("checkpoint of {}", self.id)),
                None => e,
            });
        }
        Ok(DumpStats {
            criu_ms: Some(stats.criu_ms),
            frozen_ms: stats.frozen_ms,
        })
    }

    /// A dump that failed half-way (CRIU killed at its deadline, say) may
    /// leave the freezer cgroup frozen or the tasks stopped: undo both,
    /// unless the user had paused the container.
    pub fn recover_after_failed_dump(&self) {
        if self.init.status() == Status::Paused {
            return;
        }
        if let Err(e) = self.runc.resume(&self.id) {
            log::debug!("thaw after failed dump: {e}");
        }
        self.resume_stopped();
    }

    /// After a checkpoint that froze the container itself failed: thaw it
    /// (a CRIU killed mid-dump may have thawed it already, so runc may say
    /// it is not paused) and undo what the dump may have left (stopped
    /// tasks, CRIU's network lock).
    pub fn thaw_after_failed_checkpoint(&self) {
        if let Err(e) = self.runc.resume(&self.id) {
            log::debug!("thaw after a failed checkpoint: {e}");
        }
        if self.init.status() == Status::Paused {
            self.init.set_status(Status::Running);
        }
        self.resume_stopped();
    }

    pub fn runc_kill_all(&self, signal: u32) -> Result<()> {
        self.runc.kill(&self.id, signal, true)
    }

    /// SIGCONT to every process, after a dump that left them stopped. CRIU
    /// keeps the network locked for tasks it leaves stopped (or when it
    /// died mid-dump): the lock goes first.
    pub fn resume_stopped(&self) {
        crate::netfix::unlock_criu_network(self.init.pid(), &crate::reaper::MonitorReaper);
        if let Err(e) = self.runc.kill(&self.id, libc::SIGCONT as u32, true) {
            log::warn!("resume {} after dump: {e}", self.id);
        }
    }

    pub fn add_exec(&self, exec_id: &str, stdio: StdioPaths, spec: Vec<u8>) -> Result<()> {
        if self.init.status() == Status::Stopped {
            return Err(Error::FailedPrecondition(format!(
                "container {} is stopped",
                self.id
            )));
        }
        let mut execs = self.execs.lock().unwrap();
        if execs.contains_key(exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {exec_id} already exists"
            )));
        }
        execs.insert(
            exec_id.to_string(),
            Arc::new(Process::new(exec_id, stdio, Some(spec))),
        );
        Ok(())
    }

    /// `runc exec --detach`; `register` is called with the pid before the
    /// pid can be missed by the exit dispatcher.
    pub fn start_exec(&self, exec_id: &str) -> Result<i32> {
        self.not_moving_out()?;
        let p = self.process(exec_id)?;
        if p.status() != Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} was already started"
            )));
        }
        let dir = self.bundle.join(format!("exec-{}", sanitize(exec_id)));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create exec dir", e))?;
        let process_json = dir.join("process.json");
        std::fs::write(&process_json, p.spec.as_deref().unwrap_or_default())
            .map_err(|e| Error::io("write exec process.json", e))?;
        let pid_file = dir.join("pid");
        let result = self.spawn_exec(&p, &process_json, &pid_file);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn spawn_exec(&self, p: &Process, process_json: &Path, pid_file: &Path) -> Result<i32> {
        let console = p.stdio.terminal.then(ConsoleSocket::new).transpose()?;
        let console_path = console.as_ref().map(ConsoleSocket::path);
        let spawn = SpawnOpts {
            pid_file,
            console_socket: console_path.as_deref(),
            no_pivot: false,
            no_new_keyring: self.no_new_keyring,
        };
        match &console {
            Some(console) => {
                self.runc
                    .exec(&self.id, process_json, &spawn, Default::default())?;
                p.set_io(ProcessIo::terminal(console.receive_master()?, &p.stdio)?);
            }
            None => {
                let (child, io) = ProcessIo::pipes(&p.stdio)?;
                self.runc.exec(&self.id, process_json, &spawn, child)?;
                p.set_io(io);
            }
        }
        let pid = read_pid(pid_file)?;
        p.set_pid(pid);
        p.set_status(Status::Running);
        Ok(pid)
    }

    pub fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let p = self.process(exec_id)?;
        let finished = || {
            // Same words as containerd's runc shim, which clients match on.
            Error::NotFound(format!(
                "process {} of {}: process already finished: not found",
                p.display_id(),
                self.id
            ))
        };
        // Answered at once, never behind a Delete: containerd closes a
        // container's connection as soon as its Delete returns.
        if p.status() == Status::Stopped {
            return Err(finished());
        }
        let _one_at_a_time = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        if p.status() == Status::Stopped {
            return Err(finished());
        }
        if exec_id.is_empty() {
            return self.runc.kill(&self.id, signal, all).map_err(|e| {
                // runc says "container not running" when init just exited.
                if p.status() == Status::Stopped {
                    Error::NotFound(format!("{}: process already finished: not found", self.id))
                } else {
                    e
                }
            });
        }
        let pid = p.pid();
        if pid <= 0 {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} not started"
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("bad signal {signal}")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(|e| match e {
            nix::errno::Errno::ESRCH => Error::NotFound(format!(
                "exec {exec_id}: process already finished: not found"
            )),
            e => Error::io("kill exec", e.into()),
        })
    }

    pub fn remove_exec(&self, exec_id: &str) -> Result<Arc<Process>> {
        let p = self.process(exec_id)?;
        if p.status() == Status::Running {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} is still running"
            )));
        }
        self.execs.lock().unwrap().remove(exec_id);
        Ok(p)
    }

    /// Fails while the container's memory moves to another node.
    pub fn not_moving_out(&self) -> Result<()> {
        if self.moving_out.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::FailedPrecondition(format!(
                "container {} is frozen while its memory moves to another node (post-copy); \
                 it exits once the move is done, or runs on if it is called off",
                self.id
            )));
        }
        Ok(())
    }

    pub fn pause(&self) -> Result<()> {
        self.not_moving_out()?;
        self.runc.pause(&self.id)?;
        self.init.set_status(Status::Paused);
        Ok(())
    }

    pub fn resume(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        self.not_moving_out()?;
        if self.thawed_early.swap(false, Ordering::SeqCst) && self.init.status() == Status::Running
        {
            return Ok(());
        }
        self.runc.resume(&self.id)?;
        self.init.set_status(Status::Running);
        Ok(())
    }

    pub fn update(&self, resources_json: &[u8]) -> Result<()> {
        self.not_moving_out()?;
        let path = self.bundle.join("resources.json");
        std::fs::write(&path, resources_json).map_err(|e| Error::io("write resources", e))?;
        let r = self.runc.update(&self.id, &path);
        let _ = std::fs::remove_file(&path);
        r
    }

    pub fn pids(&self) -> Result<Vec<i32>> {
        self.runc.ps(&self.id)
    }

    pub fn stats(&self) -> Result<serde_json::Value> {
        self.runc.stats(&self.id)
    }

    /// `runc delete` and unmount. Safe to call more than once.
    pub fn destroy(&self) -> Result<()> {
        let _one_at_a_time = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        let result = match self.runc.delete(&self.id, true) {
            Err(Error::Runc { message, .. }) if message.contains("does not exist") => Ok(()),
            other => other,
        };
        if self.rootfs_mounted {
            unmount_rootfs(&self.bundle.join("rootfs"));
        }
        result
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Only reached with a live runc container when create failed half-way.
        if self.init.exit().is_none() {
            let _ = self.runc.delete(&self.id, true);
        }
        if self.rootfs_mounted {
            unmount_rootfs(&self.bundle.join("rootfs"));
        }
    }
}

/// What a lazy restore does when a page cannot be had: the container's
/// tasks die, since their memory can never be whole.
fn kill_on_failure(runc: Arc<dyn Runtime>, id: &str) -> OnFailure {
    let id = id.to_string();
    Box::new(move |_why| {
        if let Err(e) = runc.kill(&id, libc::SIGKILL as u32, true) {
            log::error!("{id}: cannot kill it after restoring its memory failed: {e}");
        }
    })
}

fn read_pid(path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("read pid file {}", path.display()), e))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Other(format!("bad pid file {}: {text:?}", path.display())))
}

/// Exec ids come from clients; keep them from naming other directories.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A CRIU failure the front reported, as the error containerd should see:
/// a deadline is DEADLINE_EXCEEDED, a missing or too old CRIU is
/// FAILED_PRECONDITION.
fn criu_failure(f: &FrontFailure, what: &str) -> Error {
    let message = format!("{what} failed: {}", f.message);
    match f.kind {
        FailureKind::Timeout => Error::DeadlineExceeded(message),
        FailureKind::Unsupported => Error::FailedPrecondition(message),
        FailureKind::Criu => Error::Other(message),
    }
}

/// Mounts containerd's rootfs mounts at `target`. Returns whether anything
/// was mounted (no mounts: the bundle already has its rootfs).
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<bool> {
    if mounts.is_empty() {
        return Ok(false);
    }
    std::fs::create_dir_all(target).map_err(|e| Error::io("create rootfs dir", e))?;
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = containerd_shim::mount::mount_rootfs(
            Some(m.fs_type.as_str()).filter(|t| !t.is_empty()),
            Some(m.source.as_str()),
            &m.options,
            target,
        ) {
            if i > 0 {
                unmount_rootfs(target);
            }
            return Err(Error::Other(format!(
                "mount {} ({}) at {}: {e}",
                m.source,
                m.fs_type,
                target.display()
            )));
        }
    }
    Ok(true)
}

/// Unmounts everything at `target` (lazy, so a busy mount does not leak).
pub fn unmount_rootfs(target: &Path) {
    use nix::mount::{umount2, MntFlags};
    for _ in 0..16 {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(_) => break,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn exec_ids_cannot_escape_the_bundle() {
        assert_eq!(sanitize("../../etc"), "______etc");
        assert_eq!(sanitize("exec-1_a"), "exec-1_a");
    }

    use crate::runc::fake::{Fake, FAKE_PID};

    /// A container `c` on the fake runtime, its bundle in `bundle`.
    pub(crate) fn container(bundle: &Path, fake: Arc<Fake>, restore: bool) -> Container {
        named(bundle, fake, restore, "c")
    }

    /// A container `id` on the fake runtime, its bundle in `bundle`.
    pub(crate) fn named(bundle: &Path, fake: Arc<Fake>, restore: bool, id: &str) -> Container {
        let config = criu_shim_config::ShimConfig::defaults("test");
        configured(bundle, fake, restore, id, config)
    }

    /// As [`named`], with the node's settings in `config`.
    pub(crate) fn configured(
        bundle: &Path,
        fake: Arc<Fake>,
        restore: bool,
        id: &str,
        config: criu_shim_config::ShimConfig,
    ) -> Container {
        let opts = CreateOpts {
            id: id.into(),
            bundle: bundle.to_path_buf(),
            rootfs: Vec::new(),
            stdio: StdioPaths::default(),
            no_pivot: false,
            no_new_keyring: false,
            restore: restore.then(CriuArgs::default),
            rootfs_changes: None,
            lazy_pages: None,
            pages_before_start: false,
            deadline: None,
            config,
        };
        Container::create(opts, fake).unwrap()
    }

    #[test]
    fn a_fresh_container_is_created_then_started() {
        let bundle = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let c = container(bundle.path(), fake.clone(), false);
        assert_eq!(c.init.pid(), FAKE_PID);
        assert_eq!(c.init.status(), Status::Created);
        c.start().unwrap();
        assert_eq!(fake.calls(), ["create", "start"]);
        assert_eq!(c.init.status(), Status::Running);
        assert!(c.start().is_err(), "started twice");
    }

    #[test]
    fn a_restored_container_starts_by_letting_its_stopped_tasks_run() {
        let bundle = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let c = container(bundle.path(), fake.clone(), true);
        c.start().unwrap();
        assert_eq!(
            fake.calls(),
            ["restore", format!("kill {} all", libc::SIGCONT).as_str()]
        );
    }

    #[test]
    fn killing_a_finished_process_answers_without_the_runtime() {
        let bundle = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let c = container(bundle.path(), fake.clone(), false);
        c.start().unwrap();
        c.kill("", 15, false).unwrap();
        c.init.set_exited(143);
        let err = c.kill("", 9, false).unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        assert_eq!(fake.calls(), ["create", "start", "kill 15"]);
    }

    #[test]
    fn a_failed_dump_lets_the_container_run_on() {
        let bundle = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake {
            fail_checkpoint: true,
            ..Default::default()
        });
        let c = container(bundle.path(), fake.clone(), false);
        c.start().unwrap();
        let args = CriuArgs {
            image_path: bundle.path().join("images"),
            work_path: bundle.path().join("work"),
            ..Default::default()
        };
        assert!(c.checkpoint(&args, &[]).is_err());
        assert_eq!(
            fake.calls(),
            [
                "create",
                "start",
                "checkpoint",
                "resume",
                format!("kill {} all", libc::SIGCONT).as_str()
            ]
        );
        // Not running: refused before the runtime is asked.
        c.init.set_exited(0);
        assert!(matches!(
            c.checkpoint(&args, &[]),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(fake.calls().len(), 5);
    }
}
