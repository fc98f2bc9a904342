//! The shim process's lifecycle as containerd-shim's [`Shim`] trait sees it:
//! `start` (spawn the long-lived shim, one per pod), `delete` (clean up after
//! a shim that died), and serving the Task service.

use std::path::Path;
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Config, ExitSignal, Flags, Shim, StartOpts};
use criu_shim_config::ShimConfig;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

use crate::events::Events;
use crate::messages::{FileMessage, ShimState};
use crate::reaper::MonitorReaper;
use crate::runc::Runc;
use crate::service::{Service, TaskService};

pub struct CriuShim {
    namespace: String,
    id: String,
    /// containerd's socket address (`-address`) and, for the server, our
    /// own ttrpc socket (`-socket`).
    address: String,
    socket: String,
    exit: Arc<ExitSignal>,
}

impl Shim for CriuShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        ignore_sigpipe();
        CriuShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            address: args.address.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd starts us with the bundle as working directory.
        let spec = crate::spec::Spec::read(Path::new("."));
        let grouping = criu_shim_config::grouping(&opts.id, |k| spec.annotation(k)).to_string();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        let bundle = std::env::current_dir().unwrap_or_default();
        cleanup_after_crash(&self.namespace, &self.id, &bundle);
        // The dead shim's socket, unless a live shim (the pod's, serving
        // other containers) still answers on it.
        let spec = crate::spec::Spec::read(&bundle);
        let grouping = criu_shim_config::grouping(&self.id, |k| spec.annotation(k)).to_string();
        remove_stale_socket(&containerd_shim::socket_address(
            &self.address,
            &self.namespace,
            &grouping,
        ));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(api::DeleteResponse {
            // As containerd's runc shim: the task was killed.
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(
                containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                    ..Default::default()
                },
            )
            .into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        // containerd-shim removes the socket only where containerd wrote an
        // `address` file (containerd 1.x): a socket left behind makes the
        // next shim for this id wait about a second before it takes over.
        remove_socket(&self.socket);
    }

    /// containerd's `-info`: what the runtime supports. containerd 2.2+
    /// asks every runtime and validates specs against the answer (recursive
    /// read-only mounts, idmapped mounts); the features are runc's, since
    /// runc runs the containers.
    fn runtime_info(
        runtime_id: &str,
        options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
    ) -> containerd_shim::Result<RuntimeInfo> {
        let runc = crate::service::runc_options_from_any(options)
            .ok()
            .flatten()
            .map(|o| o.binary_name)
            .filter(|b| !b.is_empty())
            .or_else(|| std::env::var(criu_shim_config::env::RUNC).ok())
            .unwrap_or_else(|| "runc".into());
        Ok(runtime_info(runtime_id, &runc))
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        sweep_staging(&self.namespace);
        let events = Events::start(publisher, self.namespace.clone());
        TaskService(Service::new(&self.namespace, events, self.exit.clone()))
    }
}

/// A new shim first removes what shims killed mid-checkpoint or mid-restore
/// left in staging (tens of MiB each), and says so in its log.
fn sweep_staging(namespace: &str) {
    let Ok(config) = ShimConfig::from_env(namespace, None) else {
        return;
    };
    for dir in crate::migrate::stage::sweep(&config.staging_dir) {
        log::warn!(
            "removed {}: staging of a shim that died during a checkpoint or restore",
            dir.display()
        );
    }
}

/// Removes the unix socket at `address` (`unix:///run/containerd/s/...`).
fn remove_socket(address: &str) {
    use std::os::unix::fs::FileTypeExt;
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    let is_socket = std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    if is_socket {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("remove socket {}: {e}", path.display());
        }
    }
}

/// Removes the socket at `address` only if nothing listens on it.
fn remove_stale_socket(address: &str) {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => remove_socket(address),
        Err(_) => {}
    }
}

/// The type URL containerd gives runtime-spec's Features structure.
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Our name and version, and `runc features` (JSON) when runc answers.
fn runtime_info(runtime_id: &str, runc: &str) -> RuntimeInfo {
    let features = std::process::Command::new(runc)
        .arg("features")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| o.stdout)
        .filter(|json| serde_json::from_slice::<serde_json::Value>(json).is_ok());
    if features.is_none() {
        log::warn!("`{runc} features` gave no answer: containerd gets no runtime features");
    }
    RuntimeInfo {
        name: runtime_id.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        features: features
            .map(|value| Any {
                type_url: FEATURES_TYPE_URL.to_string(),
                value,
                ..Default::default()
            })
            .into(),
        ..Default::default()
    }
}

/// `shim delete`: the shim died; remove the runc container and the rootfs
/// mount it left behind.
fn cleanup_after_crash(namespace: &str, id: &str, bundle: &Path) {
    let defaults = ShimConfig::defaults(namespace);
    let saved = ShimState::read(bundle);
    let (runc_bin, runc_root) = match saved {
        Some(s) => (s.runc, s.runc_root),
        None => (defaults.runc, defaults.runc_root),
    };
    let runc = Runc::new(
        &runc_bin,
        &runc_root,
        &bundle.join("log.json"),
        Arc::new(MonitorReaper),
    );
    if let Err(e) = runc.delete(id, true) {
        log::warn!("delete {id} after shim exit: {e}");
    }
    crate::container::unmount_rootfs(&bundle.join("rootfs"));
}

/// containerd-shim catches SIGPIPE only to log it, through containerd's
/// log FIFO: once containerd is gone, that write raises SIGPIPE again,
/// and a shim logging at debug level spins at full CPU for ever (seen:
/// two orphaned shims at 80% each). Ignored, a write to a closed pipe
/// just fails with EPIPE, as it does in any Rust program; children (runc,
/// CRIU, containers) still start with the default disposition, which
/// std's `Command` restores before exec.
fn ignore_sigpipe() {
    // SAFETY: sets a signal's disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}
