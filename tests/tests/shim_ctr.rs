//! The shim under a real containerd 2.x with real runc, driven by `ctr` as a
//! user would. Needs root and hack/setup.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use criu_shim_tests::{
    mounts_containing, pids_matching, text, wait_until, Containerd, IMAGE, NAMESPACE, RUNTIME,
};

fn runc_state_exists(id: &str) -> bool {
    Path::new("/run/containerd/runc")
        .join(NAMESPACE)
        .join(id)
        .exists()
}

fn cgroup_exists(id: &str) -> bool {
    // containerd's default cgroups path for ctr is /<namespace>/<id>.
    ["memory", "pids", "cpu,cpuacct", "freezer"]
        .iter()
        .any(|c| {
            Path::new("/sys/fs/cgroup")
                .join(c)
                .join(NAMESPACE)
                .join(id)
                .exists()
        })
}

#[test]
fn run_exec_output_and_exit_codes() {
    let cd = Containerd::start();
    cd.run_detached("app", &[]);
    assert_eq!(cd.task_status("app").as_deref(), Some("RUNNING"));

    let (code, out, err) = cd.exec("app", "e1", &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(code, 3, "exec exit code");
    assert_eq!(out, "out\n");
    assert!(err.contains("err"), "stderr: {err:?}");

    // The app answers with its count: state lives in the container.
    assert_eq!(cd.count("app"), 1);
    assert_eq!(cd.count("app"), 2);

    // Exit code of the init process.
    let out = cd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "seven",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
}

#[test]
fn stdin_reaches_the_container() {
    let cd = Containerd::start();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo hello-stdin | {}",
            cd.ctr_command_line(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "cat1", "cat"])
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello-stdin\n");
}

#[test]
fn a_container_that_exits_at_once() {
    let cd = Containerd::start();
    for i in 0..3 {
        let id = format!("quick{i}");
        let out = cd.ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, &id, "true"]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(!runc_state_exists(&id));
    }
}

#[test]
fn pause_resume_and_stats() {
    let cd = Containerd::start();
    cd.run_detached("p", &["/testapp", "-m", "16"]);
    cd.ctr_ok(&["task", "pause", "p"]);
    assert_eq!(cd.task_status("p").as_deref(), Some("PAUSED"));
    let freezer = Path::new("/sys/fs/cgroup/freezer")
        .join(NAMESPACE)
        .join("p/freezer.state");
    assert_eq!(std::fs::read_to_string(&freezer).unwrap().trim(), "FROZEN");
    cd.ctr_ok(&["task", "resume", "p"]);
    assert_eq!(cd.task_status("p").as_deref(), Some("RUNNING"));
    assert_eq!(cd.count("p"), 1, "the app works after resume");

    let metrics = cd.ctr_ok(&["task", "metrics", "p"]);
    let usage: u64 = metrics
        .lines()
        .find(|l| l.starts_with("memory.usage_in_bytes"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no memory usage in {metrics}"));
    assert!(usage > 16 << 20, "the app holds 16 MiB, stats say {usage}");
    assert!(metrics.contains("cpuacct.usage"), "{metrics}");

    let ps = cd.ctr_ok(&["task", "ps", "p"]);
    assert!(ps.contains(&cd.task_pid("p").to_string()), "{ps}");
}

#[test]
fn kill_with_a_signal_and_with_all() {
    let cd = Containerd::start();
    cd.run_detached("k", &[]);
    cd.ctr_ok(&["task", "kill", "-s", "SIGTERM", "k"]);
    wait_until(Duration::from_secs(10), "SIGTERM to stop the app", || {
        cd.task_status("k").as_deref() == Some("STOPPED")
    });
    // Killing a finished task is NotFound, as with containerd's runc shim.
    let again = cd.ctr(&["task", "kill", "k"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not found"),
        "{}",
        text(&again)
    );

    // --all reaches every process of the container.
    cd.run_detached("ka", &["sh", "-c", "sleep 1000 & sleep 1000 & wait"]);
    wait_until(Duration::from_secs(10), "children to start", || {
        cd.ctr_ok(&["task", "ps", "ka"]).lines().count() >= 4
    });
    let pids: Vec<i32> = cd
        .ctr_ok(&["task", "ps", "ka"])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    cd.ctr_ok(&["task", "kill", "--all", "-s", "SIGKILL", "ka"]);
    wait_until(Duration::from_secs(10), "all processes to die", || {
        pids.iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists())
    });
    assert_eq!(cd.task_status("ka").as_deref(), Some("STOPPED"));
}

#[test]
fn delete_leaves_no_mounts_cgroups_or_runc_state() {
    let cd = Containerd::start();
    cd.run_detached("d", &[]);
    let root = cd.dir.path().to_string_lossy().into_owned();
    assert!(
        !mounts_containing(&format!("{root}/state")).is_empty(),
        "rootfs not mounted?"
    );
    assert!(runc_state_exists("d") && cgroup_exists("d"));
    cd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "d"]);
    wait_until(Duration::from_secs(10), "task to stop", || {
        cd.task_status("d").as_deref() == Some("STOPPED")
    });
    cd.ctr_ok(&["task", "delete", "d"]);
    cd.ctr_ok(&["container", "rm", "d"]);
    assert!(
        mounts_containing(&format!("{root}/state")).is_empty(),
        "mounts left behind"
    );
    assert!(!runc_state_exists("d"), "runc state left behind");
    assert!(!cgroup_exists("d"), "cgroup left behind");
    wait_until(Duration::from_secs(10), "the shim to exit", || {
        pids_matching(&format!(
            "containerd-shim-criu-v2 -namespace {NAMESPACE} -id d "
        ))
        .is_empty()
    });
}

/// `ctr events` while a container is created, started, exec'd into, paused,
/// resumed, killed by the OOM killer and deleted.
#[test]
fn task_events_reach_containerd_in_order() {
    let cd = Containerd::start();
    let events = Command::new(criu_shim_tests::prefix().join("bin/ctr"))
        .arg("--address")
        .arg(cd.socket())
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // 32 MiB limit, 64 MiB wanted (after a second): the kernel OOM-kills the app.
    cd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "33554432",
        IMAGE,
        "ev",
        "sh",
        "-c",
        "sleep 1; exec /testapp -m 64",
    ]);
    let (code, _, _) = cd.exec("ev", "e1", &["true"]);
    assert_eq!(code, 0);
    cd.ctr_ok(&["task", "pause", "ev"]);
    cd.ctr_ok(&["task", "resume", "ev"]);
    wait_until(Duration::from_secs(20), "the OOM kill", || {
        cd.task_status("ev").as_deref() == Some("STOPPED")
    });
    cd.ctr_ok(&["task", "delete", "ev"]);
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(events.id() as i32, libc::SIGKILL) };
    let out = events.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let topics: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .collect();
    let mut it = topics.iter();
    for want in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/oom",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            it.any(|t| *t == want),
            "{want} missing or out of order in {topics:?}"
        );
    }
}

#[test]
fn a_terminal_container() {
    let cd = Containerd::start();
    // ctr -t needs a terminal of its own: `script` gives it one.
    let line = cd.ctr_command_line(&[
        "run",
        "--rm",
        "-t",
        "--runtime",
        RUNTIME,
        IMAGE,
        "tty1",
        "sh",
        "-c",
        "tty; exit 5",
    ]);
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("/dev/pts/"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
}

#[test]
fn the_shim_keeps_its_containers_across_a_containerd_restart() {
    let mut cd = Containerd::start();
    cd.run_detached("r", &[]);
    assert_eq!(cd.count("r"), 1);
    let pid = cd.task_pid("r");
    cd.restart();
    assert_eq!(cd.task_status("r").as_deref(), Some("RUNNING"));
    assert_eq!(cd.task_pid("r"), pid);
    assert_eq!(cd.count("r"), 2, "same process, same memory");
    cd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "r"]);
    wait_until(Duration::from_secs(10), "task to stop", || {
        cd.task_status("r").as_deref() == Some("STOPPED")
    });
}

/// With containerd gone, its log FIFO has no reader: a shim that logs
/// (here: its container exits, the exit cannot be published) must not
/// spin on SIGPIPE (containerd-shim catches it only to log it, which
/// raises it again). It stays idle, and containerd learns of the exit
/// once it is back.
#[test]
fn a_shim_whose_containerd_is_gone_stays_idle() {
    let mut cd = Containerd::start();
    // Its own id: a run that failed half-way must not collide with the next.
    let id = format!("idle-{}", criu_shim_tests::unique());
    cd.run_detached(&id, &[]);
    let task = cd.task_pid(&id);
    let shims = pids_matching(&format!("-namespace {NAMESPACE} -id {id} "));
    assert_eq!(shims.len(), 1, "one shim: {shims:?}");
    let cpu_ticks = |pid: i32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    cd.stop();
    unsafe { libc::kill(task, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(shims[0]);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(shims[0]) - before;
    // containerd back before anything is asserted, so that it cleans up
    // whatever happens.
    cd.restart();
    // 100 ticks a second: a spinning shim burns 150 or more in 2 s.
    assert!(
        spent < 20,
        "the shim spent {spent} ticks of CPU in 2 s, idle"
    );
    // containerd learns of the exit (and cleans the task up).
    wait_until(Duration::from_secs(10), "the exit to be known", || {
        matches!(cd.task_status(&id).as_deref(), None | Some("STOPPED"))
    });
}

#[test]
fn a_killed_shim_is_cleaned_up_by_shim_delete() {
    let cd = Containerd::start();
    cd.run_detached("x", &[]);
    let task = cd.task_pid("x");
    let shims = pids_matching(&format!("-namespace {NAMESPACE} -id x "));
    assert_eq!(shims.len(), 1, "one shim for x: {shims:?}");
    unsafe { libc::kill(shims[0], libc::SIGKILL) };
    // containerd notices, runs `containerd-shim-criu-v2 delete`, which
    // removes the runc container (killing it) and unmounts the rootfs.
    wait_until(
        Duration::from_secs(20),
        "cleanup after the shim's death",
        || !runc_state_exists("x") && !Path::new(&format!("/proc/{task}")).exists(),
    );
    let root = cd.dir.path().to_string_lossy().into_owned();
    wait_until(Duration::from_secs(10), "rootfs unmount", || {
        mounts_containing(&format!("{root}/state")).is_empty()
    });
    let _ = cd.ctr(&["task", "delete", "x"]);
    cd.ctr_ok(&["container", "rm", "x"]);
}

/// containerd may send Kill and Delete of one container at once (stopping
/// a pod); each must get its answer, never "ttrpc: closed".
#[test]
fn kill_and_delete_at_once_both_answer() {
    let cd = Containerd::start();
    for i in 0..5 {
        let id = format!("race{i}");
        cd.run_detached(&id, &["/testapp", "-m", "1"]);
        wait_until(Duration::from_secs(10), "the task to run", || {
            cd.task_status(&id).as_deref() == Some("RUNNING")
        });
        let (kill, delete) = std::thread::scope(|s| {
            let kill = s.spawn(|| cd.ctr(&["task", "kill", "-s", "SIGKILL", &id]));
            let delete = s.spawn(|| cd.ctr(&["task", "delete", "--force", &id]));
            (kill.join().unwrap(), delete.join().unwrap())
        });
        for (what, out) in [("kill", &kill), ("delete", &delete)] {
            assert!(
                !text(out).contains("ttrpc: closed"),
                "{what} of {id} got no answer: {}",
                text(out)
            );
        }
        wait_until(Duration::from_secs(10), "the task to go", || {
            let _ = cd.ctr(&["task", "delete", "--force", &id]);
            cd.task_status(&id).is_none()
        });
        cd.ctr_ok(&["container", "rm", &id]);
    }
}

/// The shim removes its ttrpc socket when it exits: a socket left in
/// /run/containerd/s made the next shim for the same id wait about a second.
#[test]
fn the_shim_removes_its_socket_when_it_exits() {
    let cd = Containerd::start();
    cd.run_detached("sock", &["/testapp", "-m", "1"]);
    let bootstrap = cd
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task")
        .join(&cd.ns)
        .join("sock/bootstrap.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bootstrap).unwrap()).unwrap();
    let address = json["address"].as_str().unwrap().to_string();
    let socket = std::path::PathBuf::from(address.trim_start_matches("unix://"));
    assert!(
        socket.exists(),
        "{} not there while the shim runs",
        socket.display()
    );
    cd.remove("sock");
    wait_until(
        Duration::from_secs(10),
        "the shim to remove its socket",
        || !socket.exists(),
    );
    // The same id again starts at once on a fresh shim.
    cd.run_detached("sock", &["/testapp", "-m", "1"]);
    wait_until(Duration::from_secs(10), "the task to run", || {
        cd.task_status("sock").as_deref() == Some("RUNNING")
    });
    cd.remove("sock");
}

/// What critest's "recursive read-only mounts" specs check, at the level
/// containerd 2.1 lets us reach (it asks only runc's own runtime type
/// for its features; 2.2+ ask ours, see `info_reports_the_runtime_and_
/// runc_s_features` in cli.rs): an `rro` bind mount is read-only all the
/// way down, a mount beneath it included, while plain `ro` leaves that
/// one writable, as under runc.
#[test]
fn a_recursive_read_only_mount_is_read_only_all_the_way_down() {
    let cd = Containerd::start();
    let host = tempfile::tempdir().unwrap();
    let sub = host.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&sub)
        .status()
        .unwrap();
    assert!(mounted.success(), "tmpfs beneath the bind mount");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&sub);
    let writes = |id: &str, options: &str| {
        let mount = format!(
            "type=bind,src={},dst=/data,options=rbind:{options}",
            host.path().display()
        );
        cd.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--mount",
            &mount,
            IMAGE,
            id,
            "/testapp",
        ]);
        let write = |path: &str| {
            let (code, _, err) = cd.exec(id, "w", &["sh", "-c", &format!("echo x > {path}")]);
            (code == 0, err)
        };
        let top = write("/data/top");
        let below = write("/data/sub/below");
        cd.remove(id);
        (top, below)
    };
    let ((top, why), (below, why_below)) = writes("rro", "rro");
    assert!(!top && why.contains("Read-only"), "rro: {why}");
    assert!(
        !below && why_below.contains("Read-only"),
        "rro reaches the mount beneath: {why_below}"
    );
    let ((top, _), (below, err)) = writes("ro", "ro");
    assert!(!top, "ro: the top is read-only");
    assert!(
        below,
        "ro (not recursive) leaves the mount beneath writable: {err}"
    );
}
