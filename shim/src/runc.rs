//! The runc driver: runc's command line, one method per subcommand.
//!
//! runc writes its own errors to a JSON log file (`--log`, `--log-format
//! json`), because its stdio is the container's stdio. Errors are read back
//! from that log so the user sees runc's reason, not just "exit status 1".
//! Exit statuses come through the [`Reaper`] (see [`crate::reaper`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use criu_sys::{ChildExit, Reaper};

use crate::error::{Error, Result};

/// runc subcommands that do not finish within this are killed.
const RUNC_TIMEOUT: Duration = Duration::from_secs(120);

/// The container side of a process's stdio, handed to runc.
#[derive(Default)]
pub struct ChildStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// What a container needs of its OCI runtime: the seam between the
/// container logic and runc, so that logic has unit tests without root
/// (see the fake in `container.rs`'s tests). [`Runc`] is the real one.
pub trait Runtime: Send + Sync {
    fn create(&self, id: &str, bundle: &Path, o: &SpawnOpts, stdio: ChildStdio) -> Result<()>;
    fn restore(
        &self,
        id: &str,
        bundle: &Path,
        args: &CriuArgs,
        o: &SpawnOpts,
        stdio: ChildStdio,
    ) -> Result<()>;
    fn start(&self, id: &str) -> Result<()>;
    fn exec(&self, id: &str, process_json: &Path, o: &SpawnOpts, stdio: ChildStdio) -> Result<()>;
    fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()>;
    fn delete(&self, id: &str, force: bool) -> Result<()>;
    fn pause(&self, id: &str) -> Result<()>;
    fn resume(&self, id: &str) -> Result<()>;
    fn update(&self, id: &str, resources_json: &Path) -> Result<()>;
    fn ps(&self, id: &str) -> Result<Vec<i32>>;
    fn stats(&self, id: &str) -> Result<serde_json::Value>;
    fn checkpoint(&self, id: &str, args: &CriuArgs, env: &[(&str, &str)]) -> Result<()>;
}

impl Runtime for Runc {
    fn create(&self, id: &str, bundle: &Path, o: &SpawnOpts, stdio: ChildStdio) -> Result<()> {
        Runc::create(self, id, bundle, o, stdio)
    }
    fn restore(
        &self,
        id: &str,
        bundle: &Path,
        args: &CriuArgs,
        o: &SpawnOpts,
        stdio: ChildStdio,
    ) -> Result<()> {
        Runc::restore(self, id, bundle, args, o, stdio)
    }
    fn start(&self, id: &str) -> Result<()> {
        Runc::start(self, id)
    }
    fn exec(&self, id: &str, process_json: &Path, o: &SpawnOpts, stdio: ChildStdio) -> Result<()> {
        Runc::exec(self, id, process_json, o, stdio)
    }
    fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        Runc::kill(self, id, signal, all)
    }
    fn delete(&self, id: &str, force: bool) -> Result<()> {
        Runc::delete(self, id, force)
    }
    fn pause(&self, id: &str) -> Result<()> {
        Runc::pause(self, id)
    }
    fn resume(&self, id: &str) -> Result<()> {
        Runc::resume(self, id)
    }
    fn update(&self, id: &str, resources_json: &Path) -> Result<()> {
        Runc::update(self, id, resources_json)
    }
    fn ps(&self, id: &str) -> Result<Vec<i32>> {
        Runc::ps(self, id)
    }
    fn stats(&self, id: &str) -> Result<serde_json::Value> {
        Runc::stats(self, id)
    }
    fn checkpoint(&self, id: &str, args: &CriuArgs, env: &[(&str, &str)]) -> Result<()> {
        Runc::checkpoint(self, id, args, env)
    }
}

#[derive(Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
    log: PathBuf,
    criu: Option<PathBuf>,
    criu_env: Vec<(String, String)>,
    criu_timeout: Duration,
    systemd_cgroup: bool,
    reaper: Arc<dyn Reaper>,
}

/// `runc checkpoint` / `runc restore` options (containerd's CheckpointOptions).
#[derive(Debug, Clone, Default)]
pub struct CriuArgs {
    pub image_path: PathBuf,
    pub work_path: PathBuf,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub empty_ns: Vec<String>,
    pub cgroups_mode: Option<String>,
    /// Restore without private memory: a lazy-pages daemon serves it;
    /// dump without it: CRIU's page server serves it (`page_server`).
    pub lazy_pages: bool,
    /// Where a lazy dump's page server listens (`ADDR:PORT`).
    pub page_server: Option<String>,
}

impl CriuArgs {
    fn apply(&self, cmd: &mut Command, restore: bool) {
        cmd.arg("--image-path").arg(&self.image_path);
        cmd.arg("--work-path").arg(&self.work_path);
        if self.leave_running && !restore {
            cmd.arg("--leave-running");
        }
        for (on, flag) in [
            (self.tcp_established, "--tcp-established"),
            (self.ext_unix_sk, "--ext-unix-sk"),
            (self.shell_job, "--shell-job"),
            (self.file_locks, "--file-locks"),
            (self.lazy_pages, "--lazy-pages"),
        ] {
            if on {
                cmd.arg(flag);
            }
        }
        if let (Some(at), false) = (&self.page_server, restore) {
            cmd.arg("--page-server").arg(at);
        }
        for ns in &self.empty_ns {
            cmd.arg("--empty-ns").arg(ns);
        }
        if let Some(mode) = &self.cgroups_mode {
            cmd.arg("--manage-cgroups-mode").arg(mode);
        }
    }
}

/// Options of `runc create` / `runc exec`.
pub struct SpawnOpts<'a> {
    pub pid_file: &'a Path,
    pub console_socket: Option<&'a Path>,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
}

impl Runc {
    pub fn new(binary: &Path, root: &Path, log: &Path, reaper: Arc<dyn Reaper>) -> Self {
        Runc {
            binary: binary.to_path_buf(),
            root: root.to_path_buf(),
            log: log.to_path_buf(),
            criu: None,
            criu_env: Vec::new(),
            criu_timeout: RUNC_TIMEOUT,
            systemd_cgroup: false,
            reaper,
        }
    }

    /// runc's `--systemd-cgroup` (containerd's `SystemdCgroup = true`).
    pub fn with_systemd_cgroup(mut self, on: bool) -> Self {
        self.systemd_cgroup = on;
        self
    }

    /// Points runc at a CRIU (`runc --criu`) run with these extra variables.
    /// `timeout` bounds checkpoint and restore (CRIU's own deadline is
    /// shorter, so CRIU's error normally wins).
    pub fn with_criu(mut self, criu: &Path, env: Vec<(String, String)>, timeout: Duration) -> Self {
        self.criu = Some(criu.to_path_buf());
        self.criu_env = env;
        self.criu_timeout = timeout;
        self
    }

    /// `env` adds front settings for this checkpoint only.
    pub fn checkpoint(&self, id: &str, args: &CriuArgs, env: &[(&str, &str)]) -> Result<()> {
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        cmd.arg("checkpoint");
        args.apply(&mut cmd, false);
        cmd.arg(id);
        self.run("checkpoint", cmd, ChildStdio::default()).map(drop)
    }

    /// `runc restore --detach`: the container comes back from `args.image_path`.
    pub fn restore(
        &self,
        id: &str,
        bundle: &Path,
        args: &CriuArgs,
        o: &SpawnOpts,
        stdio: ChildStdio,
    ) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("restore")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle);
        args.apply(&mut cmd, true);
        spawn_args(&mut cmd, o);
        cmd.arg(id);
        self.run("restore", cmd, stdio).map(drop)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .arg("--log-format")
            .arg("json");
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        if let Some(criu) = &self.criu {
            cmd.arg("--criu").arg(criu);
            cmd.envs(self.criu_env.iter().map(|(k, v)| (k, v)));
        }
        cmd
    }

    pub fn create(&self, id: &str, bundle: &Path, o: &SpawnOpts, stdio: ChildStdio) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("create").arg("--bundle").arg(bundle);
        spawn_args(&mut cmd, o);
        cmd.arg(id);
        self.run("create", cmd, stdio).map(drop)
    }

    pub fn start(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["start", id]);
        self.run("start", cmd, ChildStdio::default()).map(drop)
    }

    pub fn exec(
        &self,
        id: &str,
        process_json: &Path,
        o: &SpawnOpts,
        stdio: ChildStdio,
    ) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("exec")
            .arg("--detach")
            .arg("--process")
            .arg(process_json);
        spawn_args(&mut cmd, o);
        cmd.arg(id);
        self.run("exec", cmd, stdio).map(drop)
    }

    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id).arg(signal.to_string());
        self.run("kill", cmd, ChildStdio::default()).map(drop)
    }

    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("delete");
        if force {
            cmd.arg("--force");
        }
        cmd.arg(id);
        self.run("delete", cmd, ChildStdio::default()).map(drop)
    }

    pub fn pause(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["pause", id]);
        self.run("pause", cmd, ChildStdio::default()).map(drop)
    }

    pub fn resume(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["resume", id]);
        self.run("resume", cmd, ChildStdio::default()).map(drop)
    }

    /// `runc update --resources FILE` with an OCI LinuxResources JSON.
    pub fn update(&self, id: &str, resources_json: &Path) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("update")
            .arg("--resources")
            .arg(resources_json)
            .arg(id);
        self.run("update", cmd, ChildStdio::default()).map(drop)
    }

    /// Pids of every process in the container.
    pub fn ps(&self, id: &str) -> Result<Vec<i32>> {
        let mut cmd = self.command();
        cmd.args(["ps", "--format", "json", id]);
        let out = self.run("ps", cmd, ChildStdio::default())?;
        serde_json::from_str::<Option<Vec<i32>>>(out.trim())
            .map(Option::unwrap_or_default)
            .map_err(|e| Error::Other(format!("runc ps: unexpected output {out:?}: {e}")))
    }

    /// `runc events --stats`: one JSON object with the cgroup statistics.
    pub fn stats(&self, id: &str) -> Result<serde_json::Value> {
        let mut cmd = self.command();
        cmd.args(["events", "--stats", id]);
        let out = self.run("events --stats", cmd, ChildStdio::default())?;
        serde_json::from_str(out.trim())
            .map_err(|e| Error::Other(format!("runc events --stats: bad JSON: {e}")))
    }

    /// Runs one runc command to completion and returns its stdout.
    fn run(&self, op: &'static str, mut cmd: Command, stdio: ChildStdio) -> Result<String> {
        let stdout = memfd("runc-stdout")?;
        cmd.stdin(stdio.stdin.map(Stdio::from).unwrap_or_else(Stdio::null));
        match stdio.stdout {
            Some(fd) => cmd.stdout(Stdio::from(fd)),
            None => cmd.stdout(Stdio::from(
                stdout.try_clone().map_err(|e| Error::io("dup", e))?,
            )),
        };
        let stderr = memfd("runc-stderr")?;
        match stdio.stderr {
            Some(fd) => cmd.stderr(Stdio::from(fd)),
            None => cmd.stderr(Stdio::from(
                stderr.try_clone().map_err(|e| Error::io("dup", e))?,
            )),
        };
        let log_start = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);

        let mut watch = self.reaper.watch();
        let child = cmd.spawn().map_err(|e| Error::Runc {
            op,
            message: format!("cannot run {}: {e}", self.binary.display()),
        })?;
        let pid = child.id() as i32;
        // Dropping `cmd` closes our copies of the container's stdio ends.
        drop(cmd);
        drop(child);
        let limit = match op {
            "checkpoint" | "restore" => self.criu_timeout,
            _ => RUNC_TIMEOUT,
        };
        let exit = match watch.wait(pid, limit) {
            Ok(Some(exit)) => exit,
            Ok(None) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = watch.wait(pid, Duration::from_secs(5));
                return Err(Error::Runc {
                    op,
                    message: format!("did not finish within {limit:?}"),
                });
            }
            Err(e) => return Err(Error::io(format!("wait for runc {op}"), e)),
        };
        let out = read_all(stdout);
        if exit == ChildExit::Code(0) {
            return Ok(out);
        }
        let prefix = format!("runc {op} failed: ");
        let message = log_error(&self.log, log_start)
            // runc's log repeats our own "runc create failed:" prefix.
            .map(|m| m.strip_prefix(&prefix).map(str::to_string).unwrap_or(m))
            .or_else(|| Some(read_all(stderr).trim().to_string()).filter(|s| !s.is_empty()))
            .unwrap_or_else(|| format!("{exit}"));
        Err(Error::Runc { op, message })
    }
}

fn spawn_args(cmd: &mut Command, o: &SpawnOpts) {
    cmd.arg("--pid-file").arg(o.pid_file);
    if let Some(sock) = o.console_socket {
        cmd.arg("--console-socket").arg(sock);
    }
    if o.no_pivot {
        cmd.arg("--no-pivot");
    }
    if o.no_new_keyring {
        cmd.arg("--no-new-keyring");
    }
}

/// The last error runc logged after `from` (byte offset of the log file).
fn log_error(log: &Path, from: u64) -> Option<String> {
    let mut f = File::open(log).ok()?;
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut text = String::new();
    f.read_to_string(&mut text).ok()?;
    last_error_in(&text)
}

fn last_error_in(json_lines: &str) -> Option<String> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .next_back()
}

pub fn memfd(name: &str) -> Result<File> {
    let cname = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: plain syscall; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh fd we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn read_all(mut f: File) -> String {
    let mut s = String::new();
    if f.seek(SeekFrom::Start(0)).is_ok() {
        let _ = f.read_to_string(&mut s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_last_runc_error() {
        let log = r#"{"level":"info","msg":"starting","time":"t"}
{"level":"error","msg":"container_linux.go:1: first","time":"t"}
{"level":"error","msg":"exec: \"nope\": executable file not found in $PATH","time":"t"}
not json
"#;
        assert_eq!(
            last_error_in(log).unwrap(),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(last_error_in("{\"level\":\"info\",\"msg\":\"x\"}"), None);
    }

    #[test]
    fn runs_a_command_and_reports_failures_with_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let runc = Runc::new(
            Path::new("/bin/sh"),
            dir.path(),
            &dir.path().join("log.json"),
            Arc::new(criu_sys::WaitPid),
        );
        // `sh --root ...` fails; what matters is that the failure carries text.
        let err = runc.start("x").unwrap_err();
        assert!(matches!(err, Error::Runc { op: "start", .. }), "{err}");
        assert!(!err.to_string().ends_with(": "), "{err}");
    }

    #[test]
    fn global_options_reach_runc_s_command_line() {
        let runc = Runc::new(
            Path::new("runc"),
            Path::new("/run/r"),
            Path::new("/b/log.json"),
            Arc::new(crate::reaper::MonitorReaper),
        );
        let args = |r: &Runc| -> Vec<String> {
            r.command()
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            args(&runc),
            [
                "--root",
                "/run/r",
                "--log",
                "/b/log.json",
                "--log-format",
                "json"
            ]
        );
        let runc = runc.with_systemd_cgroup(true);
        assert!(args(&runc).contains(&"--systemd-cgroup".to_string()));
    }
}

/// A runtime for unit tests: records what it is asked and "creates"
/// containers by writing their pid file.
#[cfg(test)]
pub mod fake {
    use std::path::Path;
    use std::sync::Mutex;

    use super::{ChildStdio, CriuArgs, Runtime, SpawnOpts};
    use crate::error::{Error, Result};

    /// No process runs with this pid (it is above the kernel's limit).
    pub const FAKE_PID: i32 = 4_194_305;

    /// A runtime that records what it is asked and "creates" containers
    /// by writing their pid file.
    #[derive(Default)]
    pub struct Fake {
        pub calls: Mutex<Vec<String>>,
        pub fail_checkpoint: bool,
    }

    impl Fake {
        fn called(&self, what: String) {
            self.calls.lock().unwrap().push(what);
        }
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Runtime for Fake {
        fn create(&self, _: &str, _: &Path, o: &SpawnOpts, _: ChildStdio) -> Result<()> {
            self.called("create".into());
            std::fs::write(o.pid_file, FAKE_PID.to_string()).unwrap();
            Ok(())
        }
        fn restore(
            &self,
            _: &str,
            _: &Path,
            _: &CriuArgs,
            o: &SpawnOpts,
            _: ChildStdio,
        ) -> Result<()> {
            self.called("restore".into());
            std::fs::write(o.pid_file, FAKE_PID.to_string()).unwrap();
            Ok(())
        }
        fn start(&self, _: &str) -> Result<()> {
            self.called("start".into());
            Ok(())
        }
        fn exec(&self, _: &str, _: &Path, _: &SpawnOpts, _: ChildStdio) -> Result<()> {
            self.called("exec".into());
            Ok(())
        }
        fn kill(&self, _: &str, signal: u32, all: bool) -> Result<()> {
            self.called(format!("kill {signal}{}", if all { " all" } else { "" }));
            Ok(())
        }
        fn delete(&self, _: &str, _: bool) -> Result<()> {
            self.called("delete".into());
            Ok(())
        }
        fn pause(&self, _: &str) -> Result<()> {
            self.called("pause".into());
            Ok(())
        }
        fn resume(&self, _: &str) -> Result<()> {
            self.called("resume".into());
            Ok(())
        }
        fn update(&self, _: &str, _: &Path) -> Result<()> {
            self.called("update".into());
            Ok(())
        }
        fn ps(&self, _: &str) -> Result<Vec<i32>> {
            Ok(vec![FAKE_PID])
        }
        fn stats(&self, _: &str) -> Result<serde_json::Value> {
            Ok(serde_json::Value::Null)
        }
        fn checkpoint(&self, _: &str, _: &CriuArgs, _: &[(&str, &str)]) -> Result<()> {
            self.called("checkpoint".into());
            if self.fail_checkpoint {
                Err(Error::Other("CRIU said no".into()))
            } else {
                Ok(())
            }
        }
    }
}
