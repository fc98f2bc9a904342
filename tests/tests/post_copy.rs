//! Post-copy from the source node: the archive on the share holds all but
//! the memory, node B's container runs at once and its memory comes from
//! node A's frozen source, over an authenticated stream. Two real
//! containerd daemons with criu-shim, runc and CRIU; needs root and
//! hack/setup (which raises fs.pipe-max-size for CRIU's page server).

use std::path::Path;
use std::time::Duration;

use criu_shim_tests::cri::{container_config, pod_config, Cri};
use criu_shim_tests::{
    hash_parts, http_count_within, text, wait_until, Containerd, CACHE_APP, CTR_TENANT, HASH_URL,
    IMAGE,
};

/// A cluster key in `secrets` (root's, mode 0600, as the shim demands);
/// its path.
fn cluster_key(secrets: &Path) -> String {
    let key = secrets.join("cluster.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    key.display().to_string()
}

/// Both nodes hold the cluster key and serve post-copy memory on loopback
/// (they are two daemons on one machine). `extra`: more settings.
fn nodes(share: &Path, secrets: &Path, extra: &[(&str, &str)]) -> (Containerd, Containerd) {
    let key = cluster_key(secrets);
    let mut env = vec![
        ("CRIU_SHIM_ARCHIVE_KEY_FILE", key.as_str()),
        ("CRIU_SHIM_POST_COPY_ADDRESS", "127.0.0.1"),
    ];
    env.extend_from_slice(extra);
    (Containerd::node(share, &env), Containerd::node(share, &env))
}

/// Two CRI nodes in their own network namespaces holding the cluster key
/// (the harness gives each its node address for post-copy).
fn cri_nodes(share: &Path, secrets: &Path) -> (Containerd, Containerd) {
    let key = cluster_key(secrets);
    let env = [("CRIU_SHIM_ARCHIVE_KEY_FILE", key.as_str())];
    (
        Containerd::cri_net_node(share, &env),
        Containerd::cri_net_node(share, &env),
    )
}

/// A pod `cache` (uid `uid`, `annotations`) on the criu handler whose
/// container holds 128 MiB of realistic memory; (pod id, container id, pod IP).
fn run_cache_pod(
    cri: &mut Cri,
    uid: &str,
    annotations: &[(&str, &str)],
) -> (String, String, String) {
    let pod = pod_config("cache", uid, annotations, false);
    let pod_id = cri.run_pod_sandbox(&pod, "criu").expect("pod");
    let id = cri
        .create_container(&pod_id, container_config("cache", IMAGE, CACHE_APP), &pod)
        .expect("container");
    cri.start_container(&id).expect("start");
    let ip = cri.pod_ip(&pod_id).unwrap();
    (pod_id, id, ip)
}

fn dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    (
        tempfile::Builder::new()
            .prefix("criu-shim-share-")
            .tempdir()
            .unwrap(),
        tempfile::tempdir().unwrap(),
    )
}

/// Archives (complete or not) under `key` on the share.
fn on_share(share: &Path, key: &str) -> usize {
    std::fs::read_dir(share.join(CTR_TENANT).join(key))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".criu.tar"))
                .count()
        })
        .unwrap_or(0)
}

/// The whole move: B answers at once, counts on, holds the source's
/// memory exactly; A's source exits once every page has moved, and the
/// archive (useless without its source) leaves the share. The restored
/// container is first class: exec, and a later (cold) checkpoint that
/// carries its memory back to A.
#[test]
fn post_copy_moves_the_container_and_the_source_exits_once_its_memory_has_moved() {
    let (share, secrets) = dirs();
    let (a, b) = nodes(share.path(), secrets.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "64", "--fill", "realistic"]);
    assert_eq!(a.count("app"), 1);
    let before = a.memory_hash("app", "h1");

    // The operator waits for the move, watching its progress.
    let cli = std::process::Command::new(criu_shim_tests::shim_binary())
        .args(["checkpoint", "--namespace", &a.ns, "--state"])
        .arg(a.dir.path().join("state"))
        .args(["--to", "pc", "--post-copy", "--wait", "app"])
        .env("CRIU_SHIM_PROGRESS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "the archive on the share", || {
        on_share(share.path(), "pc") == 1
    });
    let out = b.run_restored_with("app", "pc", &["criu-shim.io/migration=lazy"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(b.count("app"), 2, "the count continues");
    let (code, _, err) = b.exec("app", "ls", &["ls", "/"]);
    assert_eq!(code, 0, "exec works while pages move: {err}");
    let metrics = b.ctr(&["task", "metrics", "app"]);
    assert!(metrics.status.success(), "stats: {}", text(&metrics));
    assert_eq!(
        b.memory_hash("app", "h2"),
        before,
        "the memory did not arrive whole"
    );

    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("CLI: {said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        said.contains("MiB of memory moved") && said.contains("the source has exited"),
        "{said}"
    );
    wait_until(Duration::from_secs(30), "the source to exit", || {
        matches!(a.task_status("app").as_deref(), None | Some("STOPPED"))
    });
    wait_until(Duration::from_secs(10), "A to log the end", || {
        a.log().contains("the dump ended and the source exited")
    });
    wait_until(Duration::from_secs(10), "B to log the end", || {
        b.log().contains("every page moved; the source")
    });
    wait_until(Duration::from_secs(10), "the archive to leave", || {
        on_share(share.path(), "pc") == 0
    });
    for (node, log) in [("A", a.log()), ("B", b.log())] {
        for l in log.lines().filter(|l| l.contains("post-copy")) {
            eprintln!("{node}: {l}");
        }
    }

    let out = b.cli_checkpoint("app", &["--to", "back"]);
    assert!(out.status.success(), "{}", text(&out));
    a.remove("app");
    let out = a.run_restored("app", "back");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(a.count("app"), 3);
    assert_eq!(
        a.memory_hash("app", "h3"),
        before,
        "the memory did not come back whole"
    );
}

/// A post-copy archive restored cold (the restoring pod does not ask for
/// lazy): Create returns only once every page is in from the source, the
/// tasks still stopped, and the copy then counts on with all its memory.
#[test]
fn a_post_copy_archive_restored_cold_has_all_its_memory_before_it_runs() {
    let (share, secrets) = dirs();
    let (a, b) = nodes(share.path(), secrets.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "64", "--fill", "realistic"]);
    assert_eq!(a.count("app"), 1);
    let before = a.memory_hash("app", "h1");
    let out = a.cli_checkpoint("app", &["--to", "pcc", "--post-copy"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = b.run_restored("app", "pcc");
    assert!(out.status.success(), "{}", text(&out));
    // Every page was in before Create returned.
    let log = b.log();
    let (all_in, created) = (
        log.find("app: all 64 MiB of memory in place"),
        log.find("created container app "),
    );
    assert!(
        all_in.is_some() && created.is_some() && all_in < created,
        "B created the container before its memory was in: {log}"
    );
    wait_until(Duration::from_secs(10), "A to log the end", || {
        a.log().contains("the dump ended and the source exited")
    });
    assert_eq!(b.count("app"), 2, "the count continues");
    assert_eq!(
        b.memory_hash("app", "h2"),
        before,
        "the memory did not arrive whole"
    );
}

/// Nobody restores (node B never comes, or cannot reach A): once the
/// relay has waited CRIU_SHIM_POST_COPY_IDLE_TIMEOUT the transfer is
/// called off, the source runs on where it was, with its memory, and the
/// archive leaves the share.
#[test]
fn when_no_node_restores_the_source_runs_on_and_the_archive_goes() {
    let (share, secrets) = dirs();
    let settings = [
        ("CRIU_SHIM_LAZY_TIMEOUT", "1"),
        ("CRIU_SHIM_POST_COPY_IDLE_TIMEOUT", "3"),
    ];
    let (a, _b) = nodes(share.path(), secrets.path(), &settings);
    a.run_detached("app", &["/testapp", "-m", "16", "--fill", "realistic"]);
    assert_eq!(a.count("app"), 1);
    let before = a.memory_hash("app", "h1");
    let out = a.cli_checkpoint("app", &["--to", "nobody", "--post-copy"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until(
        Duration::from_secs(30),
        "the transfer to be called off",
        || a.log().contains("post-copy of app called off"),
    );
    assert!(
        a.log().contains("no restoring node connected"),
        "{}",
        a.log()
    );
    wait_until(Duration::from_secs(10), "the archive to leave", || {
        on_share(share.path(), "nobody") == 0
    });
    assert_eq!(a.count("app"), 2, "the source runs on, counting");
    assert_eq!(
        a.memory_hash("app", "h2"),
        before,
        "the source's memory changed"
    );
}

/// Node B's shim dies mid-copy: the relay sees the stream end before
/// "done" and calls the transfer off; A's source resumes with its memory.
#[test]
fn when_the_restoring_node_dies_mid_copy_the_source_runs_on() {
    let (share, secrets) = dirs();
    let (a, b) = nodes(share.path(), secrets.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "1024", "--fill", "realistic"]);
    assert_eq!(a.count("app"), 1);
    let before = a.memory_hash("app", "h1");
    let out = a.cli_checkpoint("app", &["--to", "dies", "--post-copy"]);
    assert!(out.status.success(), "{}", text(&out));
    // Lazy: Create returns at once, with most of a GiB still to move.
    let out = b.run_restored_with("app", "dies", &["criu-shim.io/migration=lazy"]);
    assert!(out.status.success(), "{}", text(&out));
    let shim = shim_of(&b, b.task_pid("app"));
    kill_9(shim);
    wait_until(
        Duration::from_secs(30),
        "the transfer to be called off",
        || a.log().contains("post-copy of app called off"),
    );
    assert!(
        !a.log().contains("the dump ended and the source exited"),
        "the source was killed although B never had all its memory"
    );
    assert_eq!(a.count("app"), 2, "the source runs on, counting");
    assert_eq!(
        a.memory_hash("app", "h2"),
        before,
        "the source's memory changed"
    );
}

/// The source's shim (and with it the relay) dies mid-copy: node B's copy
/// cannot have its memory, so it is killed, with the reason in B's log;
/// it does not run on with missing pages.
#[test]
fn when_the_source_dies_mid_copy_the_restored_copy_is_killed() {
    let (share, secrets) = dirs();
    let (a, b) = nodes(share.path(), secrets.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "1024", "--fill", "realistic"]);
    assert_eq!(a.count("app"), 1);
    let out = a.cli_checkpoint("app", &["--to", "gone", "--post-copy"]);
    assert!(out.status.success(), "{}", text(&out));
    let shim = shim_of(&a, a.task_pid("app"));
    let out = b.run_restored_with("app", "gone", &["criu-shim.io/migration=lazy"]);
    assert!(out.status.success(), "{}", text(&out));
    kill_9(shim);
    wait_until(Duration::from_secs(40), "B's copy to be killed", || {
        b.log().contains("app: restoring its memory failed")
    });
    assert!(b.log().contains("the source 127.0.0.1:"), "{}", b.log());
    wait_until(Duration::from_secs(10), "B's copy to be dead", || {
        matches!(b.task_status("app").as_deref(), None | Some("STOPPED"))
    });
}

fn kill_9(pid: i32) {
    let ok = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -9 {pid}");
}

/// The shim process that is the parent of a task's init.
fn shim_of(_node: &Containerd, pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Drops every packet to and from a loopback port while it lives.
struct Cut {
    port: u16,
}

impl Cut {
    fn iptables(op: &str, port: u16) -> bool {
        ["--dport", "--sport"].iter().all(|dir| {
            std::process::Command::new("iptables")
                .args([op, "INPUT", "-i", "lo", "-p", "tcp", dir])
                .arg(port.to_string())
                .args(["-j", "DROP"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
    }

    fn new(port: u16) -> Cut {
        assert!(
            Cut::iptables("-I", port),
            "iptables (hack/setup installs it)"
        );
        Cut { port }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        Cut::iptables("-D", self.port);
    }
}

/// The relay's port, from node A's log.
fn relay_port(a: &Containerd) -> u16 {
    let log = a.log();
    let at = log
        .rfind("wait for the restoring node at 127.0.0.1:")
        .expect("the relay's address in A's log");
    let rest = &log[at + "wait for the restoring node at 127.0.0.1:".len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap()]
        .parse()
        .unwrap()
}

/// The network between the nodes is cut mid-copy: B's copy, missing
/// pages, is killed once the source has been silent for
/// CRIU_SHIM_LAZY_TIMEOUT; only later (CRIU_SHIM_POST_COPY_IDLE_TIMEOUT,
/// which must be longer) does A call the transfer off and its source run
/// on, with its memory: the two copies never run at once.
#[test]
fn a_cut_network_kills_the_copy_first_and_then_resumes_the_source() {
    let (share, secrets) = dirs();
    let settings = [
        ("CRIU_SHIM_LAZY_TIMEOUT", "2"),
        ("CRIU_SHIM_POST_COPY_IDLE_TIMEOUT", "6"),
    ];
    let (a, b) = nodes(share.path(), secrets.path(), &settings);
    a.run_detached("app", &["/testapp", "-m", "1024", "--fill", "realistic"]);
    assert_eq!(a.count("app"), 1);
    let before = a.memory_hash("app", "h1");
    let out = a.cli_checkpoint("app", &["--to", "cut", "--post-copy"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = b.run_restored_with("app", "cut", &["criu-shim.io/migration=lazy"]);
    assert!(out.status.success(), "{}", text(&out));
    let cut = Cut::new(relay_port(&a));
    let started = std::time::Instant::now();
    wait_until(Duration::from_secs(30), "B's copy to be killed", || {
        b.log().contains("app: restoring its memory failed")
    });
    // The copy died first: A still waits, its source frozen.
    assert!(
        !a.log().contains("post-copy of app called off"),
        "A resumed its source before B's copy was killed ({:?} after the cut)",
        started.elapsed()
    );
    wait_until(Duration::from_secs(10), "B's copy to be dead", || {
        matches!(b.task_status("app").as_deref(), None | Some("STOPPED"))
    });
    wait_until(
        Duration::from_secs(30),
        "A to call the transfer off",
        || a.log().contains("post-copy of app called off"),
    );
    drop(cut);
    assert_eq!(a.count("app"), 2, "the source runs on, counting");
    assert_eq!(
        a.memory_hash("app", "h2"),
        before,
        "the source's memory changed"
    );
}

/// Post-copy between two CRI nodes in their own network namespaces, as a
/// cluster runs it: the pod on A is checkpointed with the operators' CLI
/// (by the id `crictl ps` shows), a pod on B restores it lazily, the page
/// stream goes between the node addresses. B answers with the count
/// carried on, the writable layer and the whole memory; A's container
/// exits once its memory has moved; both nodes end clean.
#[test]
fn a_pod_moves_post_copy_between_cri_nodes() {
    let (share, secrets) = dirs();
    let (a, b) = cri_nodes(share.path(), secrets.path());
    let (mut ca, mut cb) = (a.cri(), b.cri());
    let (pod_a, id_a, ip_a) =
        run_cache_pod(&mut ca, "uid-a", &[("criu-shim.io/checkpoint-to", "pc")]);
    assert_eq!(http_count_within(&ip_a, 8080, Duration::from_secs(30)), 1);
    let hash = |cri: &mut Cri, id: &str| {
        let (code, out, err) = cri.exec_sync(id, &["wget", "-qO-", HASH_URL]).unwrap();
        assert_eq!(code, 0, "{err}");
        hash_parts(&out)
    };
    let before = hash(&mut ca, &id_a);
    let (code, _, err) = ca
        .exec_sync(&id_a, &["sh", "-c", "echo kept > /state.txt"])
        .unwrap();
    assert_eq!(code, 0, "{err}");

    let out = a.cli_checkpoint(&id_a[..12], &["--post-copy"]);
    assert!(out.status.success(), "{}", text(&out));
    let (pod_b, id_b, ip_b) = run_cache_pod(
        &mut cb,
        "uid-b",
        &[
            ("criu-shim.io/restore-from", "pc"),
            ("criu-shim.io/migration", "lazy"),
        ],
    );
    assert_eq!(http_count_within(&ip_b, 8080, Duration::from_secs(30)), 2);
    let (code, out, err) = cb.exec_sync(&id_b, &["cat", "/state.txt"]).unwrap();
    assert_eq!((code, out.as_str()), (0, "kept\n"), "{err}");
    assert_eq!(
        hash(&mut cb, &id_b),
        before,
        "the memory did not arrive whole"
    );
    let a_addr = a.net.as_ref().unwrap().address().to_string();
    assert!(
        b.log()
            .contains(&format!("post-copy: connected to the source {a_addr}:")),
        "the pages did not come from A's node address"
    );
    wait_until(Duration::from_secs(30), "A's container to exit", || {
        ca.container_status(&id_a).unwrap().state != 1
    });
    for (cri, pod) in [(&mut ca, &pod_a), (&mut cb, &pod_b)] {
        cri.stop_pod_sandbox(pod).unwrap();
        cri.remove_pod_sandbox(pod).unwrap();
    }
    for node in [&a, &b] {
        let staging: Vec<_> = std::fs::read_dir(node.staging())
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(staging.is_empty(), "staging left: {staging:?}");
    }
    assert_eq!(
        on_share_in(share.path(), criu_shim_tests::POD_TENANT, "pc"),
        0
    );
}

/// Archives under `key` of `tenant` on the share, in any container's
/// directory.
fn on_share_in(share: &Path, tenant: &str, key: &str) -> usize {
    walk(&share.join(tenant).join(key))
        .iter()
        .filter(|p| p.to_string_lossy().contains(".criu.tar"))
        .count()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The kubelet's checkpoint API on a pod annotated
/// `criu-shim.io/migration: post-copy`: CheckpointContainer returns with
/// containerd's export holding no memory, the pod on B (the same
/// annotations, as a controller would make it) runs from the share's
/// archive with its memory served by A, and A's container exits once it
/// has moved.
#[test]
fn the_kubelet_checkpoint_api_moves_a_post_copy_pod() {
    let (share, secrets) = dirs();
    let (a, b) = cri_nodes(share.path(), secrets.path());
    let (mut ca, mut cb) = (a.cri(), b.cri());
    let post_copy = ("criu-shim.io/migration", "post-copy");
    let (pod_a, id_a, ip_a) = run_cache_pod(
        &mut ca,
        "uid-a",
        &[("criu-shim.io/checkpoint-to", "kpc"), post_copy],
    );
    assert_eq!(http_count_within(&ip_a, 8080, Duration::from_secs(30)), 1);
    let export = share.path().join("kubelet-export.tar");
    ca.checkpoint_container(&id_a, &export)
        .expect("CheckpointContainer");
    let exported = std::fs::metadata(&export).unwrap().len();
    assert!(
        exported < 16 << 20,
        "containerd's export holds {exported} bytes: memory it should not have"
    );
    let (pod_b, _id_b, ip_b) = run_cache_pod(
        &mut cb,
        "uid-b",
        &[("criu-shim.io/restore-from", "kpc"), post_copy],
    );
    assert_eq!(http_count_within(&ip_b, 8080, Duration::from_secs(30)), 2);
    wait_until(Duration::from_secs(30), "A's container to exit", || {
        ca.container_status(&id_a).unwrap().state != 1
    });
    wait_until(
        Duration::from_secs(10),
        "A to log that it served the memory",
        || a.log().contains("the dump ended and the source exited"),
    );
    for (cri, pod) in [(&mut ca, &pod_a), (&mut cb, &pod_b)] {
        cri.stop_pod_sandbox(pod).unwrap();
        cri.remove_pod_sandbox(pod).unwrap();
    }
}
