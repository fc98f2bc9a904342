//! End-to-end harness: throwaway containerd daemons that run criu-shim.
//!
//! Every [`Containerd`] has its own root, state dir, socket and config in a
//! temporary directory, so tests run in parallel and never touch a system
//! containerd. The daemon finds `containerd-shim-criu-v2` through its PATH,
//! which starts with a directory holding the shim built from this checkout.
//! Binaries (containerd, ctr, CRIU) come from hack/setup's prefix.

pub mod cri;
pub mod sshfs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const IMAGE: &str = "criu-shim.test/testapp:latest";
pub const PAUSE_IMAGE: &str = "criu-shim.test/pause:latest";
pub const RUNTIME: &str = "io.containerd.criu.v2";
/// Where on the share the checkpoints of plain containerd containers go.
pub const CTR_TENANT: &str = "containerd";
/// Where on the share the checkpoints of pods in namespace `default` go.
pub const POD_TENANT: &str = "k8s-default";
pub const NAMESPACE: &str = "e2e";

pub fn prefix() -> PathBuf {
    std::env::var_os("CRIU_SHIM_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/criu-shim".into())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo_build(args: &[&str]) {
    let status = Command::new(env!("CARGO"))
        .arg("build")
        .args(args)
        .current_dir(workspace())
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// The shim binary from this checkout (built once per test process), or
/// the one `CRIU_SHIM_BINARY` names (benchmarks use the release build).
pub fn shim_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("CRIU_SHIM_BINARY") {
            return PathBuf::from(bin);
        }
        cargo_build(&["-p", "criu-shim", "--bin", "containerd-shim-criu-v2"]);
        let bin = workspace().join("target/debug/containerd-shim-criu-v2");
        assert!(bin.exists(), "{} not built", bin.display());
        bin
    })
}

/// The test image archive (built once per test process).
pub fn image_archive() -> &'static Path {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        let out =
            std::env::temp_dir().join(format!("criu-shim-test-image-{}.tar", std::process::id()));
        let status = Command::new(workspace().join("hack/build-test-image"))
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .expect("run hack/build-test-image");
        assert!(status.success(), "hack/build-test-image failed");
        out
    })
}

/// A containerd daemon of our own.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    /// containerd namespace of this daemon's containers. Two "nodes" on one
    /// machine get different ones, so their runc state and cgroups (keyed by
    /// namespace) do not collide as they never would on real nodes.
    pub ns: String,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// The node's own network namespace (hack/node-net), if it has one.
    pub net: Option<NodeNet>,
}

/// A node's network: namespace `criu-shim-nINDEX`, pods in 10.213.INDEX.0/24,
/// reachable from the host (see hack/node-net).
pub struct NodeNet {
    pub index: u32,
}

impl NodeNet {
    /// Takes the first free node index and builds its network, with the
    /// CNI config written to `conf_dir`.
    pub fn create(conf_dir: &Path) -> NodeNet {
        std::fs::create_dir_all(conf_dir).unwrap();
        for index in 1..=250 {
            let status = Command::new(workspace().join("hack/node-net"))
                .args(["up", &index.to_string()])
                .arg(conf_dir)
                .status()
                .expect("run hack/node-net");
            match status.code() {
                Some(0) => return NodeNet { index },
                Some(3) => continue,
                _ => panic!("hack/node-net up {index} failed"),
            }
        }
        panic!("no free node index (stale criu-shim-n* namespaces? `ip netns list`)")
    }

    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/criu-shim-n{}", self.index))
    }

    /// The node's own address (its end of the link to the host), which
    /// other nodes reach through the host.
    pub fn address(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 212, self.index as u8, 2)
    }

    pub fn pod_subnet_prefix(&self) -> String {
        format!("10.213.{}.", self.index)
    }
}

impl Drop for NodeNet {
    fn drop(&mut self) {
        let _ = Command::new(workspace().join("hack/node-net"))
            .args(["down", &self.index.to_string()])
            .status();
    }
}

impl Containerd {
    /// Starts a daemon and imports the test image into it.
    pub fn start() -> Containerd {
        Self::start_with(NAMESPACE.to_string(), Vec::new())
    }

    /// A "node": a daemon whose shims publish to and restore from `share`,
    /// staging under its own directory. `env` adds shim settings.
    pub fn node(share: &Path, env: &[(&str, &str)]) -> Containerd {
        let mut all = vec![(
            "CRIU_SHIM_SHARE_DIR".to_string(),
            share.display().to_string(),
        )];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::start_with(format!("node{}-{}", std::process::id(), unique()), all)
    }

    /// A node with containerd's CRI plugin on, the way the kubelet uses it:
    /// runtime handler `criu` on our shim (pod annotations `criu-shim.io/*`
    /// passed into container specs), the local pause image, CNI from
    /// Debian's plugins with the config in this node's directory.
    pub fn cri_node(share: &Path) -> Containerd {
        let env = vec![
            (
                "CRIU_SHIM_SHARE_DIR".to_string(),
                share.display().to_string(),
            ),
            ("CRI_NODE".to_string(), "1".to_string()),
        ];
        Self::start_with("k8s.io".to_string(), env)
    }

    /// A CRI node in a network namespace of its own, with CNI pod
    /// networking (bridge + host-local, its own subnet), as a real node:
    /// pod IPs are reachable from the host, and two such nodes never share
    /// addresses. `env` adds shim settings.
    pub fn cri_net_node(share: &Path, env: &[(&str, &str)]) -> Containerd {
        let mut all = vec![
            (
                "CRIU_SHIM_SHARE_DIR".to_string(),
                share.display().to_string(),
            ),
            ("CRI_NODE".to_string(), "1".to_string()),
            ("NODE_NET".to_string(), "1".to_string()),
        ];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::start_with("k8s.io".to_string(), all)
    }

    pub fn cri(&self) -> cri::Cri {
        cri::Cri::connect(&self.socket()).expect("CRI connection")
    }

    pub fn staging(&self) -> PathBuf {
        self.dir.path().join("staging")
    }

    fn start_with(ns: String, mut env: Vec<(String, String)>) -> Containerd {
        assert!(
            prefix().join("bin/containerd").exists(),
            "containerd missing: run hack/setup"
        );
        let dir = tempfile::Builder::new()
            .prefix("criu-shim-e2e-")
            .tempdir()
            .unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(shim_binary(), bin.join("containerd-shim-criu-v2")).unwrap();
        let with_cri = env.iter().any(|(k, _)| k == "CRI_NODE");
        let mut config = Command::new(workspace().join("hack/lib/containerd-config"));
        config.arg(dir.path()).env("CD_LOG_LEVEL", "debug");
        if with_cri {
            std::fs::create_dir_all(dir.path().join("cni")).unwrap();
            config.arg(dir.path().join("cni"));
        }
        let out = config.output().expect("run hack/lib/containerd-config");
        assert!(out.status.success(), "containerd-config: {}", text(&out));
        std::fs::write(dir.path().join("config.toml"), out.stdout).unwrap();
        // Staging under the node's directory, unless the caller chose one.
        if !env.iter().any(|(k, _)| k == "CRIU_SHIM_STAGING_DIR") {
            env.push((
                "CRIU_SHIM_STAGING_DIR".to_string(),
                dir.path().join("staging").display().to_string(),
            ));
        }
        let net = env
            .iter()
            .any(|(k, _)| k == "NODE_NET")
            .then(|| NodeNet::create(&dir.path().join("cni")));
        if let Some(n) = &net {
            // Post-copy memory goes between node addresses.
            env.push((
                "CRIU_SHIM_POST_COPY_ADDRESS".to_string(),
                n.address().to_string(),
            ));
        }
        let mut c = Containerd {
            dir,
            ns,
            child: None,
            env,
            net,
        };
        c.launch();
        let out = c.ctr(&["images", "import", image_archive().to_str().unwrap()]);
        assert!(out.status.success(), "image import: {}", text(&out));
        c
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .unwrap();
        let path = format!(
            "{}:{}:{}",
            self.dir.path().join("bin").display(),
            prefix().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new(prefix().join("bin/containerd"));
        // Only the network namespace: mounts stay the host's, as on a node.
        let netns =
            (self.net.as_ref()).map(|n| std::fs::File::open(n.netns()).expect("node netns"));
        if let Some(netns) = &netns {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = netns.as_raw_fd();
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .env("PATH", path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.child = Some(child);
        wait_until(Duration::from_secs(20), "containerd to serve", || {
            self.ctr(&["version"]).status.success()
        });
    }

    /// Stops the daemon (SIGTERM), leaving shims and containers running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same root, state and socket.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The command line of `ctr` for this daemon (to run under `script`, say).
    pub fn ctr_command_line(&self, args: &[&str]) -> String {
        let mut s = format!(
            "{} --address {} -n {}",
            prefix().join("bin/ctr").display(),
            self.socket().display(),
            self.ns
        );
        for a in args {
            s.push(' ');
            s.push_str(&shell_quote(a));
        }
        s
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(prefix().join("bin/ctr"))
            .arg("--address")
            .arg(self.socket())
            .arg("-n")
            .arg(&self.ns)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// `ctr` that must succeed; returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(out.status.success(), "ctr {args:?} failed: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the test app detached in container `id` on our runtime.
    pub fn run_detached(&self, id: &str, cmd: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", RUNTIME, IMAGE, id];
        args.extend_from_slice(cmd);
        self.ctr_ok(&args);
    }

    /// Task status as `ctr task ls` prints it (RUNNING, PAUSED, STOPPED, ...).
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines().find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.get(2).unwrap_or(&"").to_string())
        })
    }

    pub fn task_pid(&self, id: &str) -> i32 {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines()
            .find_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.first() == Some(&id)).then(|| cols[1].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no task {id}"))
    }

    /// Runs `cmd` in the container; returns (exit code, stdout, stderr).
    /// The test app's digest of its memory (`GET /hash`: the digest and
    /// the bytes it covers), asked from inside container `id` by an exec
    /// named `exec_id`: equal digests before and after a move mean every
    /// byte arrived.
    pub fn memory_hash(&self, id: &str, exec_id: &str) -> Vec<String> {
        let (code, out, err) = self.exec(id, exec_id, &["wget", "-qO-", HASH_URL]);
        assert_eq!(code, 0, "{err}");
        hash_parts(&out)
    }

    pub fn exec(&self, id: &str, exec_id: &str, cmd: &[&str]) -> (i32, String, String) {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
        args.extend_from_slice(cmd);
        let out = self.ctr(&args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Asks the test app in container `id` for its next count (over the
    /// container's own loopback, through an exec of busybox wget). A refused
    /// connection (the app still filling its memory) is retried: it was not
    /// counted.
    pub fn count(&self, id: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let exec_id = format!("count-{}", unique());
            let (code, out, err) =
                self.exec(id, &exec_id, &["wget", "-qO-", "http://127.0.0.1:8080/"]);
            if code == 0 {
                return out
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("bad count {out:?}"));
            }
            assert!(
                err.contains("Connection refused") && Instant::now() < deadline,
                "wget in {id} failed: {err}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Removes the task and container, whatever state they are in.
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        wait_until(Duration::from_secs(10), "task to stop", || {
            !matches!(self.task_status(id).as_deref(), Some("RUNNING" | "PAUSED"))
        });
        let _ = self.ctr(&["task", "delete", id]);
        let _ = self.ctr(&["container", "rm", id]);
    }

    /// `containerd-shim-criu-v2 checkpoint ... ID` (our CLI) against this daemon.
    pub fn cli_checkpoint(&self, id: &str, extra: &[&str]) -> Output {
        Command::new(shim_binary())
            .args(["checkpoint", "--namespace", &self.ns, "--state"])
            .arg(self.dir.path().join("state"))
            .args(extra)
            .arg(id)
            .stdin(Stdio::null())
            .output()
            .expect("run the CLI")
    }

    /// Creates and starts `id` restored from `reference` (our annotation).
    pub fn run_restored(&self, id: &str, reference: &str) -> Output {
        self.run_restored_with(id, reference, &[])
    }

    /// [`Containerd::run_restored`] with more annotations (`name=value`).
    pub fn run_restored_with(&self, id: &str, reference: &str, annotations: &[&str]) -> Output {
        let ann = format!("criu-shim.io/restore-from={reference}");
        let mut args = vec!["run", "-d", "--runtime", RUNTIME, "--annotation", &ann];
        for a in annotations {
            args.extend(["--annotation", a]);
        }
        args.extend([IMAGE, id]);
        self.ctr(&args)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // CRIU_SHIM_TEST_LOGS=DIR keeps every daemon's log (shim logs
        // included) for reading after the run.
        if let Some(keep) = std::env::var_os("CRIU_SHIM_TEST_LOGS") {
            let keep = PathBuf::from(keep);
            let name = self.dir.path().file_name().unwrap().to_owned();
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(
                self.dir.path().join("containerd.log"),
                keep.join(name).with_extension("log"),
            );
        }
        // Kill what our tests left, then the daemon; shims exit with their
        // tasks. Pods first, through the CRI: that also removes their
        // network namespaces and CNI state.
        if self.child.is_some() && self.env.iter().any(|(k, _)| k == "CRI_NODE") {
            if let Ok(mut cri) = cri::Cri::connect(&self.socket()) {
                for pod in cri.list_pods().unwrap_or_default() {
                    let _ = cri.stop_pod_sandbox(&pod.id);
                    let _ = cri.remove_pod_sandbox(&pod.id);
                }
            }
        }
        if self.child.is_some() {
            let out = self.ctr(&["task", "ls", "-q"]);
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                self.remove(id.trim());
            }
        }
        self.stop();
        // runc keeps the root directory of a namespace after its last
        // container; one per test node would pile up in /run. Only an
        // empty one goes (remove_dir), so leaked runc state stays visible.
        if self.ns.starts_with("node") {
            let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.ns));
        }
        // Anything still mounted under our root would make the tempdir removal fail.
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(self.dir.path().join("state"))
            .stderr(Stdio::null())
            .status();
    }
}

pub fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The Update RPC (ctr has no command for it; the kubelet's
/// UpdateContainerResources calls it): sets the memory limit of `id`,
/// talking to its shim directly.
pub fn update_memory_limit(cd: &Containerd, id: &str, bytes: u64) {
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    let bundle = cd
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task")
        .join(&cd.ns)
        .join(id);
    let boot = std::fs::read_to_string(bundle.join("bootstrap.json")).expect("bootstrap.json");
    let address = boot
        .split("\"address\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("address in bootstrap.json");
    let client = containerd_shim_protos::ttrpc::Client::connect(address).expect("connect to shim");
    let tasks = containerd_shim_protos::shim_sync::TaskClient::new(client);
    let req = containerd_shim_protos::api::UpdateTaskRequest {
        id: id.to_string(),
        resources: Some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: format!("{{\"memory\":{{\"limit\":{bytes}}}}}").into_bytes(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    tasks
        .update(
            containerd_shim_protos::ttrpc::context::with_timeout(0),
            &req,
        )
        .expect("Update RPC");
}

/// A share that fills up: a tmpfs of `size` (`2m`, say) on a fresh
/// directory, unmounted when dropped (declare it before the nodes using it).
pub struct SmallShare {
    dir: tempfile::TempDir,
}

impl SmallShare {
    pub fn mount(size: &str) -> SmallShare {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(mounted.success(), "mount a {size} tmpfs as the share");
        SmallShare { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallShare {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// One GET of the test app at `ip:port` from the host: its next count.
pub fn http_count(ip: &str, port: u16) -> std::io::Result<u64> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{ip}:{port}")
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let count = body.rsplit("\r\n\r\n").next().unwrap_or("").trim();
    count.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a count: {body:?}"),
        )
    })
}

/// [`http_count`], retried until the app answers (it may still be filling
/// its memory, or be restoring) or `limit` passes.
pub fn http_count_within(ip: &str, port: u16, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        match http_count(ip, port) {
            Ok(n) => return n,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("no answer from {ip}:{port} within {limit:?}: {e}"),
        }
    }
}

/// Mount points whose path contains `needle`.
pub fn mounts_containing(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.contains(needle))
        .collect()
}

/// Pids of processes whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

pub fn empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

/// A ctr node must be exactly as before a failed restore of `id`: no task,
/// no runc state, no mounts, nothing in staging, no cgroup.
pub fn assert_clean(node: &Containerd, id: &str) {
    assert!(node.task_status(id).is_none(), "a task {id} is left");
    assert!(
        !Path::new("/run/containerd/runc")
            .join(&node.ns)
            .join(id)
            .exists(),
        "runc state of {id} left"
    );
    let bundle = node
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task")
        .join(&node.ns)
        .join(id);
    assert!(
        mounts_containing(&bundle.display().to_string()).is_empty(),
        "mounts of {id} left"
    );
    assert!(
        empty_dir(&node.staging()),
        "staging files left: {:?}",
        std::fs::read_dir(node.staging())
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    assert!(
        !Path::new("/sys/fs/cgroup/memory")
            .join(&node.ns)
            .join(id)
            .exists(),
        "cgroup of {id} left"
    );
}

/// checkpointctl (from hack/setup) with `args`; asserts it succeeds and
/// returns what it printed.
pub fn checkpointctl(args: &[&str]) -> String {
    let bin = prefix().join("bin/checkpointctl");
    assert!(bin.exists(), "{} missing: run hack/setup", bin.display());
    let out = Command::new(&bin)
        .args(args)
        .output()
        .expect("run checkpointctl");
    assert!(
        out.status.success(),
        "checkpointctl {args:?}: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What operators run on a checkpoint archive, with checkpointctl: `show`,
/// `inspect` with every option, `memparse`. Returns `show`'s output and
/// `inspect --ps-tree --files --sockets`'s.
pub fn checkpointctl_reads(archive: &Path) -> (String, String) {
    let a = archive.to_str().unwrap();
    let show = checkpointctl(&["show", a]);
    checkpointctl(&["inspect", "--all", a]);
    let inspect = checkpointctl(&["inspect", "--ps-tree", "--files", "--sockets", a]);
    for option in [
        "--ps-tree",
        "--ps-tree-cmd",
        "--ps-tree-env",
        "--files",
        "--sockets",
        "--mounts",
        "--stats",
    ] {
        checkpointctl(&["inspect", option, a]);
    }
    checkpointctl(&["memparse", a]);
    (show, inspect)
}

/// The test app's memory digest, as served inside its container.
pub const HASH_URL: &str = "http://127.0.0.1:8080/hash";

/// The test app as a cache: 128 MiB of realistic records, each answer
/// reading 16 pages (the pod the CRI and post-copy tests move).
pub const CACHE_APP: &[&str] = &[
    "/testapp",
    "-m",
    "128",
    "--fill",
    "realistic",
    "--touch",
    "16",
];

/// `GET /hash`'s answer: the digest and the bytes it covers.
pub fn hash_parts(answer: &str) -> Vec<String> {
    let parts: Vec<String> = answer.split_whitespace().map(str::to_string).collect();
    assert_eq!(parts.len(), 2, "not a memory digest: {answer:?}");
    parts
}
