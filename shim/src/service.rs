//! The Task service: containerd's task API (v3) over ttrpc, kept thin. Each
//! RPC unpacks its request, calls [`Container`], publishes the event
//! containerd expects, and maps errors with [`crate::error`].
//!
//! Exits arrive from containerd-shim's reaper on a monitor subscription
//! taken when the service starts, before any container exists. An exec can
//! exit before `runc exec` has even told us its pid; such exits wait in
//! `early` until the pid is registered.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use containerd_shim::api;
use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim::oci::Options as RuncProtoOptions;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use criu_shim_config::{RuncOptions, ShimConfig};

use crate::checkpoint;
use crate::container::{Container, CreateOpts, Mount};
use crate::criu_front::env as front_env;
use crate::error::{Error, Result};
use crate::events::{Event, Events};
use crate::messages::{FileMessage, ShimState};
use crate::migrate::unpack::Deadline;
use crate::process::{Exit, Process, Status};
use crate::reaper::MonitorReaper;
use crate::restore;
use crate::runc::Runc;
use crate::spec::Spec;
use crate::stdio::StdioPaths;

/// Where an exited pid belongs.
#[derive(Clone)]
struct Owner {
    container: String,
    exec: String,
}

#[derive(Default)]
struct Pids {
    owners: HashMap<i32, Owner>,
    /// Exits of pids not (yet) registered, with when they arrived.
    early: HashMap<i32, (i32, Instant)>,
}

pub struct Service {
    namespace: String,
    /// Task RPCs being served: Shutdown waits for them, so that no answer
    /// is cut off by the shim's exit.
    inflight: std::sync::atomic::AtomicUsize,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pids: Mutex<Pids>,
    events: Events,
    exit: Arc<ExitSignal>,
}

impl Service {
    pub fn new(namespace: &str, events: Events, exit: Arc<ExitSignal>) -> Arc<Service> {
        let svc = Arc::new(Service {
            namespace: namespace.to_string(),
            inflight: Default::default(),
            containers: Mutex::new(HashMap::new()),
            pids: Mutex::new(Pids::default()),
            events,
            exit,
        });
        svc.clone().spawn_exit_dispatcher();
        svc
    }

    fn spawn_exit_dispatcher(self: Arc<Self>) {
        let sub = monitor_subscribe(Topic::Pid).expect("subscribe to exits");
        std::thread::Builder::new()
            .name("exits".into())
            .spawn(move || {
                for ev in sub.rx.iter() {
                    if let Subject::Pid(pid) = ev.subject {
                        self.on_exit(pid, ev.exit_code);
                    }
                }
            })
            .expect("spawn exit dispatcher");
    }

    fn on_exit(self: &Arc<Self>, pid: i32, code: i32) {
        let owner = {
            let mut pids = self.pids.lock().unwrap();
            match pids.owners.remove(&pid) {
                Some(o) => o,
                None => {
                    // runc and CRIU children land here too; keep a short memory.
                    let now = Instant::now();
                    pids.early
                        .retain(|_, (_, t)| now.duration_since(*t) < Duration::from_secs(30));
                    pids.early.insert(pid, (code, now));
                    return;
                }
            }
        };
        let Ok(c) = self.container(&owner.container) else {
            return;
        };
        let Ok(p) = c.process(&owner.exec) else {
            return;
        };
        // Draining output can take a moment; keep the dispatcher free.
        let svc = self.clone();
        std::thread::spawn(move || {
            if p.set_exited(code as u32) {
                svc.events.send(Event::Exit(TaskExit {
                    container_id: owner.container.clone(),
                    id: if owner.exec.is_empty() {
                        owner.container.clone()
                    } else {
                        owner.exec.clone()
                    },
                    pid: pid as u32,
                    exit_status: code as u32,
                    exited_at: MessageField::some(timestamp(p.exit().map(|e| e.at))),
                    ..Default::default()
                }));
            }
        });
    }

    /// Links `pid` to its process, handling an exit that came first.
    fn register_pid(self: &Arc<Self>, pid: i32, container: &str, exec: &str) {
        let early = {
            let mut pids = self.pids.lock().unwrap();
            pids.owners.insert(
                pid,
                Owner {
                    container: container.to_string(),
                    exec: exec.to_string(),
                },
            );
            pids.early.remove(&pid)
        };
        if let Some((code, _)) = early {
            self.on_exit(pid, code);
        }
    }

    /// Marks a Task RPC in flight until the guard is dropped.
    fn busy(&self) -> Busy<'_> {
        self.inflight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(&self.inflight)
    }

    /// Waits (up to `limit`) until no Task RPC is in flight.
    fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.inflight.load(std::sync::atomic::Ordering::SeqCst) > 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
    }

    fn do_create(
        self: &Arc<Self>,
        req: &api::CreateTaskRequest,
        deadline: Deadline,
    ) -> Result<u32> {
        if self.containers.lock().unwrap().contains_key(&req.id) {
            return Err(Error::AlreadyExists(format!(
                "container {} already exists",
                req.id
            )));
        }
        let runc_opts = runc_options(req)?;
        let config = ShimConfig::from_env(&self.namespace, runc_opts.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        save_shim_state(&bundle, &config);
        let runc = runc_for(&config, &bundle);
        // Holds a fetched archive's staging until the restore is done.
        let mut prepared = restore::prepare(req, &bundle, &config, deadline)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let opts = CreateOpts {
            id: req.id.clone(),
            bundle: bundle.clone(),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| Mount {
                    fs_type: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio,
            no_pivot: config.no_pivot_root,
            no_new_keyring: config.no_new_keyring,
            restore: prepared.as_ref().map(|p| p.args.clone()),
            rootfs_changes: prepared.as_ref().and_then(|p| p.rootfs_changes.clone()),
            lazy_pages: prepared.as_mut().and_then(|p| p.lazy.take()),
            pages_before_start: prepared.as_ref().is_some_and(|p| p.pages_before_start),
            deadline: deadline.0,
            config: config.clone(),
        };
        let restoring = prepared.is_some();
        let started = std::time::Instant::now();
        let container = match Container::create(opts, Arc::new(runc)) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let kept = prepared
                    .as_ref()
                    .and_then(|p| p.keep_failed_log(&config.staging_dir, &req.id));
                return Err(match kept {
                    Some(log) => e.with_note(&format!("CRIU's log: {}", log.display())),
                    None => e,
                });
            }
        };
        drop(prepared);
        let pid = container.init.pid();
        self.containers
            .lock()
            .unwrap()
            .insert(req.id.clone(), container);
        self.register_pid(pid, &req.id, "");
        let svc = Arc::downgrade(self);
        let id = req.id.clone();
        crate::oom::watch(pid, move || {
            if let Some(svc) = svc.upgrade() {
                log::info!("container {id} hit its memory limit (OOM)");
                svc.events.send(Event::Oom(id.clone()));
            }
        });
        self.events.send(Event::Create(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(containerd_shim::protos::events::task::TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: pid as u32,
            ..Default::default()
        }));
        if restoring {
            log::info!(
                "restored {} from its images in {:?} (rootfs changes, runc restore)",
                req.id,
                started.elapsed()
            );
        }
        log::info!("created container {} (pid {pid})", req.id);
        Ok(pid as u32)
    }

    /// Checkpoint RPC: one container, its pod, or a post-copy move; see
    /// [`checkpoint::Plan`].
    fn do_checkpoint(&self, req: &api::CheckpointTaskRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        c.not_moving_out()?;
        checkpoint::Plan::of(&c, req)?.run(&c, || self.pod_members(&c))
    }

    /// The running containers of `c`'s pod (not its sandbox), by name, with
    /// their specs; just `c` outside a pod.
    fn pod_members(&self, c: &Arc<Container>) -> Vec<checkpoint::Member> {
        let spec = Spec::read(&c.bundle);
        let pod = if spec.is_pod_sandbox() {
            Some(c.id.clone())
        } else {
            spec.sandbox_id().map(str::to_string)
        };
        let Some(pod) = pod else {
            return vec![checkpoint::Member {
                container: c.clone(),
                spec,
            }];
        };
        let all: Vec<Arc<Container>> = self.containers.lock().unwrap().values().cloned().collect();
        // Each spec read once, outside the lock; sorted by the name in the
        // pod manifest, for logs a person can follow.
        let mut members: Vec<checkpoint::Member> = all
            .into_iter()
            .filter(|m| matches!(m.init.status(), Status::Running | Status::Paused))
            .map(|m| checkpoint::Member {
                spec: Spec::read(&m.bundle),
                container: m,
            })
            .filter(|m| !m.spec.is_pod_sandbox() && m.spec.sandbox_id() == Some(pod.as_str()))
            .collect();
        members.sort_by(|a, b| {
            (a.spec.container_name(), &a.container.id)
                .cmp(&(b.spec.container_name(), &b.container.id))
        });
        members
    }

    fn do_delete(&self, id: &str, exec_id: &str) -> Result<(u32, Exit)> {
        let c = self.container(id)?;
        if !exec_id.is_empty() {
            let p = c.remove_exec(exec_id)?;
            return Ok((p.pid() as u32, exit_or_now(&p)));
        }
        c.destroy()?;
        self.containers.lock().unwrap().remove(id);
        let exit = exit_or_now(&c.init);
        let pid = c.init.pid() as u32;
        self.events.send(Event::Delete(TaskDelete {
            container_id: id.to_string(),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(Some(exit.at))),
            id: id.to_string(),
            ..Default::default()
        }));
        Ok((pid, exit))
    }
}

/// runc for one container, pointed at our CRIU front (this binary).
fn runc_for(config: &ShimConfig, bundle: &std::path::Path) -> Runc {
    let front = std::env::current_exe().unwrap_or_else(|_| "containerd-shim-criu-v2".into());
    let env = vec![
        (
            front_env::REAL_CRIU.to_string(),
            config.criu.to_string_lossy().into_owned(),
        ),
        (
            front_env::TIMEOUT.to_string(),
            config.criu_timeout_secs.to_string(),
        ),
        (front_env::LEAVE_STOPPED.to_string(), "1".to_string()),
        (front_env::TCP_ESTABLISHED.to_string(), "1".to_string()),
        (
            front_env::NETWORK_LOCK.to_string(),
            config.network_lock.as_str().to_string(),
        ),
    ];
    Runc::new(
        &config.runc,
        &config.runc_root,
        &bundle.join("log.json"),
        Arc::new(MonitorReaper),
    )
    .with_systemd_cgroup(config.systemd_cgroup)
    .with_criu(
        &front,
        env,
        Duration::from_secs(config.criu_timeout_secs + 60),
    )
}

fn exit_or_now(p: &Process) -> Exit {
    p.exit().unwrap_or(Exit {
        status: 0,
        at: SystemTime::now(),
    })
}

fn timestamp(at: Option<SystemTime>) -> Timestamp {
    let d = at
        .unwrap_or_else(SystemTime::now)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// containerd's runc options from the create request (`options` Any).
fn runc_options(req: &api::CreateTaskRequest) -> Result<Option<RuncOptions>> {
    runc_options_from_any(req.options.as_ref())
}

/// containerd's runc options from an `Any` (create requests, `-info`).
pub fn runc_options_from_any(
    any: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
) -> Result<Option<RuncOptions>> {
    let Some(any) = any else {
        return Ok(None);
    };
    if any.value.is_empty() {
        return Ok(None);
    }
    let o = RuncProtoOptions::parse_from_bytes(&any.value).map_err(|e| {
        Error::InvalidArgument(format!(
            "runtime options ({}) are not containerd's runc options: {e}",
            any.type_url
        ))
    })?;
    Ok(Some(RuncOptions {
        binary_name: o.binary_name,
        root: o.root,
        systemd_cgroup: o.systemd_cgroup,
        no_pivot_root: o.no_pivot_root,
        no_new_keyring: o.no_new_keyring,
    }))
}

fn save_shim_state(bundle: &std::path::Path, config: &ShimConfig) {
    let state = ShimState {
        runc: config.runc.clone(),
        runc_root: config.runc_root.clone(),
    };
    if let Err(e) = state.write(bundle) {
        log::warn!("cannot save shim state in {}: {e}", bundle.display());
    }
}

/// The caller's deadline, when containerd sent one (ttrpc carries the
/// context's deadline as a timeout): work past it is wasted.
fn deadline(ctx: &TtrpcContext) -> Deadline {
    let nanos = u64::try_from(ctx.timeout_nano).unwrap_or(0);
    Deadline((nanos > 0).then(|| Instant::now() + Duration::from_nanos(nanos)))
}

fn rpc<T>(r: Result<T>) -> TtrpcResult<T> {
    r.map_err(Into::into)
}

/// A Task RPC in flight (see [`Service::busy`]).
struct Busy<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The ttrpc face of [`Service`].
#[derive(Clone)]
pub struct TaskService(pub Arc<Service>);

impl Task for TaskService {
    fn create(
        &self,
        ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let _busy = self.0.busy();
        let pid = rpc(self.0.do_create(&req, deadline(ctx)))?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let _busy = self.0.busy();
        let svc = &self.0;
        let c = rpc(svc.container(&req.id))?;
        let pid = if req.exec_id.is_empty() {
            let pid = rpc(c.start())?;
            svc.events.send(Event::Start {
                container_id: req.id.clone(),
                pid: pid as u32,
            });
            pid
        } else {
            let pid = rpc(c.start_exec(&req.exec_id))?;
            svc.register_pid(pid, &req.id, &req.exec_id);
            svc.events.send(Event::ExecStarted(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: pid as u32,
                ..Default::default()
            }));
            pid
        };
        Ok(api::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        let p = rpc(c.process(&req.exec_id))?;
        let exit = p.exit();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: p.pid() as u32,
            status: p.status().to_proto().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit
                .map(|e| MessageField::some(timestamp(Some(e.at))))
                .unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let _busy = self.0.busy();
        let (pid, exit) = rpc(self.0.do_delete(&req.id, &req.exec_id))?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(Some(exit.at))),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        let pids = rpc(c.pids())?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::api::ProcessInfo {
                    pid: pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        rpc(c.pause())?;
        self.0.events.send(Event::Paused(req.id.clone()));
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        rpc(c.resume())?;
        self.0.events.send(Event::Resumed(req.id.clone()));
        Ok(api::Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        rpc(c.kill(&req.exec_id, req.signal, req.all))?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| Error::InvalidArgument("exec without a process spec".into()));
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        rpc(spec.and_then(|s| c.add_exec(&req.exec_id, stdio, s)))?;
        self.0.events.send(Event::ExecAdded(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        }));
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        let p = rpc(c.process(&req.exec_id))?;
        rpc(p.resize(req.width, req.height))?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        let p = rpc(c.process(&req.exec_id))?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if resources.is_empty() {
            return Ok(api::Empty::new());
        }
        rpc(c.update(&resources))?;
        Ok(api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let _busy = self.0.busy();
        rpc(self.0.do_checkpoint(&req))?;
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        let p = rpc(c.process(&req.exec_id))?;
        let exit = p.wait();
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(Some(exit.at))),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let _busy = self.0.busy();
        let c = rpc(self.0.container(&req.id))?;
        let raw = rpc(c.stats())?;
        let any = rpc(crate::stats::to_any(&raw))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .0
            .container(&req.id)
            .map(|c| c.init.pid() as u32)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    /// As containerd's runc shim: the shim exits only once it serves no
    /// container (whatever `now` says), and only after the answers to
    /// requests still in flight (a Kill racing a pod's teardown) are out.
    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let empty = self.0.containers.lock().unwrap().is_empty();
        if empty {
            self.0.drain(Duration::from_secs(5));
            if !self.0.events.flush(Duration::from_secs(5)) {
                log::warn!("shutting down with task events containerd has not taken");
            }
            log::info!("shutting down");
            self.0.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::tests::named;
    use crate::runc::fake::{Fake, FAKE_PID};

    #[test]
    fn timestamps_are_unix_time() {
        let t = timestamp(Some(SystemTime::UNIX_EPOCH + Duration::new(5, 7)));
        assert_eq!((t.seconds, t.nanos), (5, 7));
    }

    fn service() -> (Arc<Service>, std::sync::mpsc::Receiver<Event>) {
        let (events, rx) = Events::captured();
        (
            Service::new("test", events, Arc::new(ExitSignal::default())),
            rx,
        )
    }

    /// A running container `id` on the fake runtime, in `svc`.
    fn add(svc: &Service, bundle: &std::path::Path, id: &str, spec: serde_json::Value) {
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        let c = named(bundle, Arc::new(Fake::default()), false, id);
        c.start().unwrap();
        svc.containers
            .lock()
            .unwrap()
            .insert(id.to_string(), Arc::new(c));
    }

    /// An exit can arrive before the pid is known (runc exec returns after
    /// its process may have died): it waits, and is delivered on register.
    #[test]
    fn an_exit_that_comes_before_its_pid_is_registered_is_not_lost() {
        let (svc, rx) = service();
        let bundle = tempfile::tempdir().unwrap();
        add(&svc, bundle.path(), "c", serde_json::json!({}));
        svc.on_exit(FAKE_PID, 137);
        assert!(rx.try_recv().is_err(), "an exit event for an unknown pid");
        svc.register_pid(FAKE_PID, "c", "");
        match rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the exit event")
        {
            Event::Exit(e) => {
                assert_eq!((e.container_id.as_str(), e.exit_status), ("c", 137));
            }
            _ => panic!("not an exit event"),
        }
        let c = svc.container("c").unwrap();
        assert_eq!(c.init.status(), Status::Stopped);
        assert_eq!(c.init.exit().map(|e| e.status), Some(137));
    }

    /// A pod checkpoint takes the running containers of the pod, not its
    /// sandbox, not other pods', by name.
    #[test]
    fn pod_members_are_the_pod_s_running_containers() {
        let (svc, _rx) = service();
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let ann = |kind: &str, pod: &str, name: &str| {
            serde_json::json!({"annotations": {
                "io.kubernetes.cri.container-type": kind,
                "io.kubernetes.cri.sandbox-id": pod,
                "io.kubernetes.cri.container-name": name,
            }})
        };
        add(&svc, dirs[0].path(), "pod1", ann("sandbox", "pod1", ""));
        add(
            &svc,
            dirs[1].path(),
            "web-id",
            ann("container", "pod1", "web"),
        );
        add(
            &svc,
            dirs[2].path(),
            "cache-id",
            ann("container", "pod1", "cache"),
        );
        add(
            &svc,
            dirs[3].path(),
            "other-id",
            ann("container", "pod2", "web"),
        );
        let web = svc.container("web-id").unwrap();
        let ids: Vec<String> = svc
            .pod_members(&web)
            .iter()
            .map(|m| m.container.id.clone())
            .collect();
        assert_eq!(ids, ["cache-id", "web-id"]);
        svc.container("cache-id").unwrap().init.set_exited(0);
        let ids: Vec<String> = svc
            .pod_members(&web)
            .iter()
            .map(|m| m.container.id.clone())
            .collect();
        assert_eq!(ids, ["web-id"], "a stopped container is not checkpointed");
    }
}
