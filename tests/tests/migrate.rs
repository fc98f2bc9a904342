//! Checkpoint on one node, restore on another, through a shared directory:
//! two real containerd 2.x daemons ("node A", "node B") with criu-shim, runc
//! and CRIU. Needs root and hack/setup.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criu_shim_tests::{
    assert_clean, empty_dir, text, unique, wait_until, Containerd, SmallShare, CTR_TENANT, IMAGE,
    RUNTIME,
};

fn share() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("criu-shim-share-")
        .tempdir()
        .unwrap()
}

/// Every file under `key` on the share (archives, markers, partials).
fn entries(share: &Path, key: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(share.join(CTR_TENANT).join(key))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The complete archives under `key`, oldest first.
fn archives(share: &Path, key: &str) -> Vec<PathBuf> {
    let mut v = entries(share, key);
    v.retain(|p| {
        let n = p.file_name().unwrap().to_string_lossy();
        !n.starts_with('.') && n.ends_with(".criu.tar.zst")
    });
    v
}

/// The test app's `GET /hash` in container `app` on `node` (by an exec
/// named `exec`): the hash of all its memory now, and when it was filled.

#[test]
fn the_counter_migrates_a_to_b_and_back_with_its_rootfs_changes() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let b = Containerd::node(share.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "64"]);
    for i in 1..=5 {
        assert_eq!(a.count("app"), i);
    }
    let (code, _, err) = a.exec(
        "app",
        "w",
        &["sh", "-c", "echo kept > /data/file && rm /bin/vi"],
    );
    assert_eq!(code, 0, "{err}");

    let out = a.cli_checkpoint("app", &["--to", "job"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("published"),
        "{}",
        text(&out)
    );
    assert_eq!(
        a.task_status("app").as_deref(),
        Some("STOPPED"),
        "exit mode stops the source"
    );
    assert_eq!(archives(share.path(), "job").len(), 1);
    assert!(empty_dir(&a.staging()), "node A staging not cleaned");

    let out = b.run_restored("app", "job");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(b.task_status("app").as_deref(), Some("RUNNING"));
    assert_eq!(b.count("app"), 6, "the count continues on node B");
    let (code, out, err) = b.exec("app", "r1", &["cat", "/data/file"]);
    assert_eq!((code, out.as_str()), (0, "kept\n"), "{err}");
    let (code, _, _) = b.exec("app", "r2", &["ls", "/bin/vi"]);
    assert_ne!(code, 0, "a file deleted before the checkpoint came back");
    assert!(empty_dir(&b.staging()), "node B staging not cleaned");

    // And back: B -> A, under a new container id on A.
    let out = b.cli_checkpoint("app", &["--to", "job"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        archives(share.path(), "job").len(),
        2,
        "a second, newer archive"
    );
    a.remove("app");
    let out = a.run_restored("app-back", "job");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(a.count("app-back"), 7, "6 was served on B");
    let (code, out, _) = a.exec("app-back", "r3", &["cat", "/data/file"]);
    assert_eq!((code, out.as_str()), (0, "kept\n"));
}

#[test]
fn a_restored_container_is_first_class_and_keeps_logging() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let b = Containerd::node(share.path(), &[]);
    let log_a = a.dir.path().join("app.log");
    let log_b = b.dir.path().join("app.log");
    let uri_a = format!("file://{}", log_a.display());
    let uri_b = format!("file://{}", log_b.display());
    a.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--log-uri",
        &uri_a,
        IMAGE,
        "fc",
    ]);
    assert_eq!(a.count("fc"), 1);
    let out = a.cli_checkpoint("fc", &["--to", "fc"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(std::fs::read_to_string(&log_a)
        .unwrap()
        .contains("served 1"));

    let ann = "criu-shim.io/restore-from=fc";
    b.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--log-uri",
        &uri_b,
        "--annotation",
        ann,
        IMAGE,
        "fc",
    ]);
    assert_eq!(b.count("fc"), 2);
    wait_until(
        Duration::from_secs(5),
        "the restored app's output in its new log",
        || {
            std::fs::read_to_string(&log_b)
                .unwrap_or_default()
                .contains("served 2")
        },
    );

    // Pause and resume.
    b.ctr_ok(&["task", "pause", "fc"]);
    assert_eq!(b.task_status("fc").as_deref(), Some("PAUSED"));
    b.ctr_ok(&["task", "resume", "fc"]);
    assert_eq!(b.count("fc"), 3);
    // Stats and update.
    let metrics = b.ctr_ok(&["task", "metrics", "fc"]);
    assert!(metrics.contains("memory.usage_in_bytes"), "{metrics}");
    criu_shim_tests::update_memory_limit(&b, "fc", 268435456);
    let limit = std::fs::read_to_string(
        Path::new("/sys/fs/cgroup/memory")
            .join(&b.ns)
            .join("fc/memory.limit_in_bytes"),
    )
    .unwrap();
    assert_eq!(
        limit.trim(),
        "268435456",
        "update reached the restored container's cgroup"
    );
    // Kill: the exit is seen.
    b.ctr_ok(&["task", "kill", "-s", "SIGTERM", "fc"]);
    wait_until(Duration::from_secs(10), "the restored task to exit", || {
        b.task_status("fc").as_deref() == Some("STOPPED")
    });
}

#[test]
fn a_leave_running_checkpoint_keeps_the_source_serving() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let b = Containerd::node(share.path(), &[]);
    a.run_detached("lr", &[]);
    assert_eq!(a.count("lr"), 1);
    let out = a.cli_checkpoint("lr", &["--to", "lr", "--leave-running"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(a.task_status("lr").as_deref(), Some("RUNNING"));
    assert_eq!(a.count("lr"), 2, "the source serves on");
    let out = b.run_restored("lr", "lr");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(b.count("lr"), 2, "the copy continues from the checkpoint");
}

#[test]
fn ctr_checkpoint_of_an_annotated_container_publishes_to_the_share() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    a.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "criu-shim.io/checkpoint-to=viactr",
        IMAGE,
        "ann",
    ]);
    assert_eq!(a.count("ann"), 1);
    let images = a.dir.path().join("ctr-images");
    a.ctr_ok(&[
        "task",
        "checkpoint",
        "--image-path",
        images.to_str().unwrap(),
        "ann",
    ]);
    assert_eq!(
        archives(share.path(), "viactr").len(),
        1,
        "no archive from the CRI/ctr path"
    );
    assert_eq!(a.task_status("ann").as_deref(), Some("RUNNING"));
    assert_eq!(a.count("ann"), 2);
}

/// A published archive to mutilate.
fn published_archive(share: &Path) -> PathBuf {
    let a = Containerd::node(share, &[]);
    a.run_detached("src", &[]);
    assert_eq!(a.count("src"), 1);
    let out = a.cli_checkpoint("src", &["--to", "good"]);
    assert!(out.status.success(), "{}", text(&out));
    archives(share, "good").pop().unwrap()
}

fn tar_zst(members: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in members {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        let raw = name.as_bytes();
        h.as_old_mut().name[..raw.len()].copy_from_slice(raw);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap()
}

#[test]
fn bad_archives_fail_create_with_a_clear_error_and_leave_node_b_clean() {
    let share = share();
    let good = published_archive(share.path());
    let bytes = std::fs::read(&good).unwrap();
    let b = Containerd::node(share.path(), &[]);
    let put = |name: &str, data: &[u8]| {
        let dir = share.path().join(CTR_TENANT).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.criu.tar.zst"), data).unwrap();
    };

    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    put("corrupt", &corrupt);
    put("truncated", &bytes[..bytes.len() / 2]);

    // A consistent-looking archive whose manifest lies about one digest.
    let mut plain = Vec::new();
    zstd::stream::read::Decoder::new(bytes.as_slice())
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    let mut members = Vec::new();
    let mut ar = tar::Archive::new(plain.as_slice());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let kind = e.header().entry_type();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        members.push((name, kind, data));
    }
    // Re-tarred as anyone who can write the share could: the original
    // frame table no longer fits, and is refused as such; without one
    // (and with digests made up for the members, which format 3 leaves
    // to the frames), the whole archive is read and the lying digest is
    // refused.
    let retarred = |keep_frames: bool| {
        let members: Vec<(&str, tar::EntryType, Vec<u8>)> = members
            .iter()
            .map(|(n, k, d)| {
                let mut d = d.clone();
                if n == "manifest.json" {
                    let mut m: serde_json::Value = serde_json::from_slice(&d).unwrap();
                    m["members"][0]["sha256"] = serde_json::json!("00".repeat(32));
                    if !keep_frames {
                        m.as_object_mut().unwrap().remove("frames");
                        for member in m["members"].as_array_mut().unwrap() {
                            member
                                .as_object_mut()
                                .unwrap()
                                .entry("sha256")
                                .or_insert(serde_json::json!("00".repeat(32)));
                        }
                    }
                    d = serde_json::to_vec(&m).unwrap();
                }
                (n.as_str(), *k, d)
            })
            .collect();
        let lying: Vec<(&str, tar::EntryType, &[u8], Option<&str>)> = members
            .iter()
            .map(|(n, k, d)| (*n, *k, d.as_slice(), None))
            .collect();
        tar_zst(&lying)
    };
    put("badsum", &retarred(false));
    put("badframes", &retarred(true));
    // Hostile members, listed in a manifest so that the members
    // themselves (not a missing manifest) are what gets refused.
    let with_manifest = |name: &str, kind: tar::EntryType, link: Option<&str>| {
        let manifest = serde_json::json!({
            "format": "criu-shim.checkpoint", "version": 2, "container_id": "x",
            "tenant": "containerd", "created": 0, "criu_version": "", "kernel": "",
            "shim_version": "", "compression": "zstd", "tcp_established": false,
            "stats": {"pages_bytes": 0},
            "members": [
                {"path": "checkpoint/inventory.img", "size": 1, "sha256": "00"},
                {"path": name, "size": 0, "sha256": "00"}
            ]
        })
        .to_string();
        tar_zst(&[
            (name, kind, b"", link),
            (
                "manifest.json",
                tar::EntryType::Regular,
                manifest.as_bytes(),
                None,
            ),
        ])
    };
    put(
        "traversal",
        &with_manifest(
            "../../../../tmp/criu-shim-pwned",
            tar::EntryType::Regular,
            None,
        ),
    );
    put(
        "symlink",
        &with_manifest(
            "checkpoint/core-1.img",
            tar::EntryType::Symlink,
            Some("/etc/shadow"),
        ),
    );
    put(
        "device",
        &with_manifest("checkpoint/mem", tar::EntryType::Char, None),
    );

    for (i, (key, expect)) in [
        ("corrupt", "corrupt"),
        ("truncated", "corrupt or truncated"),
        ("badsum", "checksum mismatch"),
        ("badframes", "frame table"),
        ("traversal", "refused"),
        ("symlink", "refused"),
        ("device", "refused"),
        ("missing", "no archive"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("bad{i}");
        let out = b.run_restored(&id, key);
        assert!(!out.status.success(), "{key}: restore succeeded?!");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expect),
            "{key}: error should say {expect:?}: {err}"
        );
        let _ = b.ctr(&["container", "rm", &id]);
        assert_clean(&b, &id);
    }
    assert!(!Path::new("/tmp/criu-shim-pwned").exists());
}

/// A CRIU wrapper in `dir` that runs `on_dump` (shell) when it is started
/// for a dump: its second start, since the first answers runc's version
/// check.
fn criu_wrapper(dir: &Path, on_dump: &str) -> PathBuf {
    let wrapper = dir.join("criu");
    let real = criu_shim_tests::prefix().join("bin/criu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nD={d}\nn=$(cat $D/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > $D/count\n\
             if [ \"$n\" -ge 2 ] && [ \"$1\" = swrk ]; then\n{on_dump}\nfi\nexec {real} \"$@\"\n",
            d = dir.display(),
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    wrapper
}

/// With either of CRIU's network locks (the shim undoes each its own way).
#[test]
fn criu_killed_mid_dump_leaves_the_source_running_and_no_archive() {
    for (lock, undone) in [
        ("nftables", "(nftables table CRIU-"),
        ("iptables", "(iptables-restore)"),
    ] {
        criu_killed_mid_dump_with(lock, undone);
    }
}

fn criu_killed_mid_dump_with(lock: &str, undone: &str) {
    let share = share();
    let dir = tempfile::tempdir().unwrap();
    // A CRIU that gets SIGKILLed 400 ms into the dump, after it locked the
    // container's network and while it copies memory (its second start:
    // the first answers runc's version check).
    let wrapper = criu_wrapper(dir.path(), "(sleep 0.4; kill -9 $$) &");
    let a = Containerd::node(
        share.path(),
        &[
            ("CRIU_SHIM_CRIU", wrapper.to_str().unwrap()),
            ("CRIU_SHIM_NETWORK_LOCK", lock),
        ],
    );
    a.run_detached("victim", &["/testapp", "-m", "512"]);
    assert_eq!(a.count("victim"), 1);
    let out = a.cli_checkpoint("victim", &["--to", "victim"]);
    assert!(
        !out.status.success(),
        "{lock}: the dump should have failed: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CRIU"), "the error should name CRIU: {err}");
    wait_until(Duration::from_secs(10), "the source to run again", || {
        a.task_status("victim").as_deref() == Some("RUNNING")
    });
    assert_eq!(
        a.count("victim"),
        2,
        "{lock}: the source keeps its state and serves"
    );
    let removed = a
        .log()
        .lines()
        .filter(|l| l.contains("removed a network lock CRIU left"))
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert!(
        removed.iter().any(|l| l.contains(undone)),
        "{lock}: the kill should have landed after CRIU locked the network, and the shim \
         removed the lock: {removed:#?}"
    );
    assert!(
        entries(share.path(), "victim").is_empty(),
        "an archive (partial or not) was left"
    );
    assert!(empty_dir(&a.staging()), "staging left behind");
}

#[test]
fn a_full_share_fails_the_checkpoint_and_the_source_keeps_running() {
    // A 2 MiB share and 16 MiB of random (incompressible) memory to publish.
    let share = SmallShare::mount("2m");

    let a = Containerd::node(share.path(), &[]);
    a.run_detached("full", &["/testapp", "-m", "16", "--random"]);
    assert_eq!(a.count("full"), 1);
    let out = a.cli_checkpoint("full", &["--to", "full"]);
    assert!(
        !out.status.success(),
        "publishing 16 MiB to a 2 MiB share succeeded?"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no space left"),
        "the error should say the share is full: {err}"
    );
    assert_eq!(a.task_status("full").as_deref(), Some("RUNNING"));
    assert_eq!(a.count("full"), 2, "the source keeps its state and serves");
    assert!(
        empty_dir(&share.path().join(CTR_TENANT).join("full")),
        "a partial archive was left on the share"
    );
    assert!(empty_dir(&a.staging()), "staging left behind");
}

#[test]
fn with_a_cluster_key_only_archives_signed_with_it_are_restored() {
    let share = share();
    let secrets = tempfile::tempdir().unwrap();
    let key = secrets.path().join("archive.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key = key.display().to_string();
    let keyed = [("CRIU_SHIM_ARCHIVE_KEY_FILE", key.as_str())];

    // Signed on A, restored on B: both nodes hold the key.
    let a = Containerd::node(share.path(), &keyed);
    let b = Containerd::node(share.path(), &keyed);
    a.run_detached("app", &[]);
    assert_eq!(a.count("app"), 1);
    let out = a.cli_checkpoint("app", &["--to", "signed"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = b.run_restored("app", "signed");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(b.count("app"), 2);

    // An archive from a node without the key (or anyone who can write the
    // share): intact, digests right, but not signed: refused, B left clean.
    let c = Containerd::node(share.path(), &[]);
    c.run_detached("src", &[]);
    assert_eq!(c.count("src"), 1);
    let out = c.cli_checkpoint("src", &["--to", "unsigned"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = b.run_restored("intruder", "unsigned");
    assert!(!out.status.success(), "an unsigned archive was restored");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not signed"), "the error says why: {err}");
    assert_clean(&b, "intruder");
}

#[test]
fn an_established_connection_inside_the_container_survives_the_move() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let b = Containerd::node(share.path(), &[]);
    // The server and a client of it, both under the container's init; the
    // client connects and stays idle: the connection is established (and
    // the server waits in read) when the container is dumped.
    a.run_detached(
        "tcp",
        &[
            "sh",
            "-c",
            "mkfifo /req; /testapp & sleep 1; nc 127.0.0.1 8080 </req >/resp & exec 3>/req; wait",
        ],
    );
    wait_until(Duration::from_secs(20), "the client to connect", || {
        let (_, out, _) = a.exec("tcp", &format!("t{}", unique()), &["cat", "/proc/net/tcp"]);
        // Local or remote port 8080 (1F90), state 01 (ESTABLISHED).
        out.lines()
            .any(|l| l.contains(":1F90 ") && l.split_whitespace().nth(3) == Some("01"))
    });
    let out = a.cli_checkpoint("tcp", &["--to", "tcp"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = b.run_restored("tcp", "tcp");
    assert!(out.status.success(), "{}", text(&out));

    // The request goes over the connection made on node A.
    let (code, _, err) = b.exec(
        "tcp",
        "req",
        &["sh", "-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' > /req"],
    );
    assert_eq!(code, 0, "{err}");
    wait_until(
        Duration::from_secs(20),
        "the answer on the old connection",
        || {
            let (_, out, _) = b.exec("tcp", &format!("r{}", unique()), &["cat", "/resp"]);
            out.contains("200 OK")
        },
    );
}

/// checkpointctl, the tool Kubernetes, Podman and CRI-O users inspect
/// checkpoints with, reads our archives: `show`, `inspect` (every option),
/// `memparse`.
#[test]
fn checkpointctl_reads_an_archive_of_the_cli() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "8"]);
    assert_eq!(a.count("app"), 1);
    let out = a.cli_checkpoint("app", &["--to", "job", "--leave-running"]);
    assert!(out.status.success(), "{}", text(&out));
    let archive = archives(share.path(), "job").pop().unwrap();
    // Our own inspect shows the same process and its privileges, verified.
    let ours = std::process::Command::new(criu_shim_tests::shim_binary())
        .arg("inspect")
        .arg(&archive)
        .output()
        .unwrap();
    assert!(ours.status.success(), "{}", text(&ours));
    let ours_text = String::from_utf8_lossy(&ours.stdout).into_owned();
    for part in [
        "processes:    1",
        "testapp",
        "uid 0",
        "verification: OK",
        "frames' BLAKE3 digests match",
    ] {
        assert!(ours_text.contains(part), "{part:?} not in: {ours_text}");
    }
    let ours = std::process::Command::new(criu_shim_tests::shim_binary())
        .args(["inspect", "--json"])
        .arg(&archive)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&ours.stdout).expect("inspect --json");
    assert_eq!(json["verified"], true);
    assert_eq!(json["processes"][0]["command"], "testapp");
    assert_eq!(json["manifest"]["tenant"], "containerd");
    let (show, inspect) = criu_shim_tests::checkpointctl_reads(&archive);
    assert!(
        show.contains("io.containerd.criu.v2") && show.contains("app"),
        "{show}"
    );
    for part in ["Checkpointed", "testapp", "0.0.0.0:8080"] {
        assert!(
            inspect.contains(part),
            "{part:?} not in checkpointctl inspect: {inspect}"
        );
    }
}

/// A dump past `CRIU_SHIM_CRIU_TIMEOUT` is stopped, reaches the caller as
/// DEADLINE_EXCEEDED (not UNKNOWN), and the source runs on.
#[test]
fn a_dump_past_its_deadline_is_deadline_exceeded_and_the_source_runs_on() {
    let share = share();
    let dir = tempfile::tempdir().unwrap();
    // A CRIU that takes 30 s to start serving a dump (the first start
    // answers runc's version check at once).
    let wrapper = criu_wrapper(dir.path(), "sleep 30");
    let a = Containerd::node(
        share.path(),
        &[
            ("CRIU_SHIM_CRIU", wrapper.to_str().unwrap()),
            ("CRIU_SHIM_CRIU_TIMEOUT", "2"),
        ],
    );
    a.run_detached("slow", &["/testapp", "-m", "8"]);
    assert_eq!(a.count("slow"), 1);
    let started = std::time::Instant::now();
    let out = a.cli_checkpoint("slow", &["--to", "slow"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEADLINE_EXCEEDED"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "not stopped at its deadline"
    );
    wait_until(Duration::from_secs(10), "the source to run again", || {
        a.task_status("slow").as_deref() == Some("RUNNING")
    });
    assert_eq!(a.count("slow"), 2);
    assert!(archives(share.path(), "slow").is_empty());
}

/// Ten checkpoints to one key at once: all published, none lost to a name
/// another took in the same millisecond.
#[test]
fn ten_checkpoints_to_one_key_at_once_all_publish() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let ids: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    for id in &ids {
        a.run_detached(id, &["/testapp", "-m", "1"]);
    }
    for id in &ids {
        assert_eq!(a.count(id), 1);
    }
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let a = &a;
                s.spawn(move || a.cli_checkpoint(id, &["--to", "same", "--leave-running"]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (id, out) in ids.iter().zip(&outs) {
        assert!(out.status.success(), "{id}: {}", text(out));
    }
    assert_eq!(archives(share.path(), "same").len(), 10);
    let leftovers: Vec<_> = entries(share.path(), "same")
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// What a shim killed mid-checkpoint left in staging (tens of MiB of
/// memory images) is removed by the next shim that starts, and logged;
/// a live shim's staging is not touched.
#[test]
fn a_new_shim_sweeps_staging_that_dead_shims_left() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let staging = a.staging();
    // A pid above the kernel's limit: its owner is certainly gone.
    let dead = staging.join("dump-app-4194305-AbC123");
    std::fs::create_dir_all(dead.join("checkpoint")).unwrap();
    std::fs::write(dead.join("checkpoint/pages-1.img"), vec![1u8; 1 << 20]).unwrap();
    let live = staging.join(format!("restore-x-{}-XyZ789", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    a.run_detached("app", &["/testapp", "-m", "1"]);
    assert_eq!(a.count("app"), 1);
    assert!(!dead.exists(), "the dead shim's staging is still there");
    assert!(live.exists(), "a live process's staging was removed");
    assert!(
        a.log().contains("staging of a shim that died"),
        "not logged"
    );
}

/// A node without a usable CRIU refuses a restore before it fetches and
/// unpacks the archive, and says which CRIU it looked for.
#[test]
fn a_missing_criu_is_found_before_the_archive_is_fetched() {
    let share = share();
    published_archive(share.path());
    let b = Containerd::node(share.path(), &[("CRIU_SHIM_CRIU", "/nonexistent/criu")]);
    let out = b.run_restored("app", "good");
    assert!(!out.status.success(), "{}", text(&out));
    let err = text(&out);
    assert!(err.contains("/nonexistent/criu"), "{err}");
    assert!(
        !b.log().contains("fetched and verified"),
        "the archive was fetched first"
    );
    let _ = b.ctr(&["container", "rm", "app"]);
    assert_clean(&b, "app");
}

/// `checkpoint` takes what operators have in hand: `containerd://ID` (as
/// Kubernetes prints container ids), a unique prefix, no --namespace when
/// only one has the container; an ambiguous prefix names the candidates.
#[test]
fn checkpoint_finds_the_container_operators_name() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    for id in ["web-1a2b", "web-3c4d"] {
        a.run_detached(id, &["/testapp", "-m", "1"]);
        assert_eq!(a.count(id), 1);
    }
    let state = a.dir.path().join("state");
    let cli = |target: &str| {
        std::process::Command::new(criu_shim_tests::shim_binary())
            .args(["checkpoint", "--leave-running", "--to", "ops", "--state"])
            .arg(&state)
            .arg(target)
            .output()
            .unwrap()
    };
    let out = cli("containerd://web-1a2b");
    assert!(out.status.success(), "{}", text(&out));
    let out = cli("web-3c");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(archives(share.path(), "ops").len(), 2);
    let out = cli("web-");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = text(&out);
    assert!(
        err.contains("ambiguous") && err.contains("web-1a2b") && err.contains("web-3c4d"),
        "{err}"
    );
}

/// Memory that looks like a program's (records, about 3.6:1 with zstd -1)
/// arrives whole: the hash of all of it after the move is the one it had
/// when it was filled.
#[test]
fn realistic_memory_arrives_whole() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let b = Containerd::node(share.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "32", "--fill", "realistic"]);
    assert_eq!(a.count("app"), 1);
    let before = a.memory_hash("app", "h1");
    assert_eq!(before[0], before[1], "the memory changed before the move");
    let out = a.cli_checkpoint("app", &["--to", "real"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = b.run_restored("app", "real");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(b.count("app"), 2, "the count continues");
    assert_eq!(
        b.memory_hash("app", "h2"),
        before,
        "the memory did not arrive whole"
    );
}

/// A long checkpoint tells the operator how far it is: bytes, rate, ETA.
#[test]
fn a_long_checkpoint_shows_its_progress() {
    let share = share();
    let dir = tempfile::tempdir().unwrap();
    // A dump that takes a while whatever the machine: CRIU starts 1.5 s late.
    let wrapper = criu_wrapper(dir.path(), "sleep 1.5");
    let a = Containerd::node(
        share.path(),
        &[("CRIU_SHIM_CRIU", wrapper.to_str().unwrap())],
    );
    a.run_detached("big", &["/testapp", "-m", "512", "--fill", "random"]);
    assert_eq!(a.count("big"), 1);
    let out = std::process::Command::new(criu_shim_tests::shim_binary())
        .args(["checkpoint", "--namespace", &a.ns, "--state"])
        .arg(a.dir.path().join("state"))
        .args(["--to", "big", "big"])
        .env("CRIU_SHIM_PROGRESS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains("checkpointing big: ") && l.contains(" MiB")),
        "no progress line: {err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("published"));
}

/// Lazy migration: node B's container answers before its memory has moved;
/// every page arrives (the memory's hash), exec works meanwhile, and a
/// later checkpoint of it carries the whole memory back to node A.
#[test]
fn a_lazy_restore_answers_at_once_and_its_memory_arrives_whole() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let b = Containerd::node(share.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "64", "--fill", "realistic"]);
    assert_eq!(a.count("app"), 1);
    let before = a.memory_hash("app", "h1");
    let out = a.cli_checkpoint("app", &["--to", "lazy"]);
    assert!(out.status.success(), "{}", text(&out));

    let out = b.run_restored_with("app", "lazy", &["criu-shim.io/migration=lazy"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(b.count("app"), 2, "the count continues");
    let (code, out, _) = b.exec("app", "ls", &["ls", "/"]);
    assert_eq!(code, 0, "exec works while pages move: {out}");
    assert_eq!(
        b.memory_hash("app", "h2"),
        before,
        "the memory did not arrive whole"
    );
    wait_until(Duration::from_secs(30), "every page in place", || {
        b.log().contains("app: all 64 MiB of memory in place")
    });
    for line in b
        .log()
        .lines()
        .filter(|l| l.contains("lazy restore") || l.contains("restored app"))
    {
        eprintln!("B: {line}");
    }

    // Back to A, cold, from a checkpoint of the lazily restored container.
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

/// A page the share cannot give as it was written (here one modified byte
/// in the memory's frames) fails the lazy restore where it is read: the
/// container is killed, not left running with a wrong page, the reason is
/// in the log, and the node is left clean.
#[test]
fn a_modified_page_kills_a_lazily_restored_container() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let b = Containerd::node(share.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "64", "--fill", "realistic"]);
    assert_eq!(a.count("app"), 1);
    let out = a.cli_checkpoint("app", &["--to", "bad"]);
    assert!(out.status.success(), "{}", text(&out));
    let archive = archives(share.path(), "bad").pop().unwrap();
    let mut bytes = std::fs::read(&archive).unwrap();
    // The middle of the archive is memory (64 MiB of it, 1 MiB frames).
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&archive, &bytes).unwrap();

    let out = b.run_restored_with("app", "bad", &["criu-shim.io/migration=lazy"]);
    wait_until(Duration::from_secs(30), "the lazy restore to fail", || {
        b.log().contains("app: restoring its memory failed")
    });
    assert!(
        b.log().contains("does not match its digest"),
        "the reason is not in the log"
    );
    wait_until(Duration::from_secs(10), "the container to be dead", || {
        matches!(b.task_status("app").as_deref(), None | Some("STOPPED"))
    });
    if out.status.success() {
        // It started before the bad frame was read; it answers no more.
        assert!(b.task_status("app").as_deref() == Some("STOPPED"));
    } else {
        assert!(
            text(&out).contains("restoring its memory failed"),
            "{}",
            text(&out)
        );
    }
    b.remove("app");
    criu_shim_tests::assert_clean(&b, "app");
}

/// The network to the share is cut while a lazily restored container's
/// pages move: it does not run on with missing memory nor hang for ever;
/// once the share has not answered for CRIU_SHIM_LAZY_TIMEOUT it is
/// killed, the reason is logged, and node B is left clean.
#[test]
fn a_share_cut_off_mid_copy_kills_the_lazily_restored_container() {
    let share = criu_shim_tests::sshfs::SshfsShare::start(2);
    let a = Containerd::node(share.mount_point(0), &[]);
    let b = Containerd::node(share.mount_point(1), &[("CRIU_SHIM_LAZY_TIMEOUT", "3")]);
    a.run_detached(
        "app",
        &["/testapp", "-m", "384", "--fill", "random", "--touch", "16"],
    );
    assert_eq!(a.count("app"), 1);
    let out = a.cli_checkpoint("app", &["--to", "cut"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = b.run_restored_with("app", "cut", &["criu-shim.io/migration=lazy"]);
    share.link_up(false);
    assert!(out.status.success(), "{}", text(&out));
    wait_until(Duration::from_secs(30), "the lazy restore to fail", || {
        b.log().contains("app: restoring its memory failed")
    });
    let log = b.log();
    assert!(log.contains("gave no answer"), "{log}");
    assert!(
        !log.contains("app: all 384 MiB of memory in place"),
        "every page moved before the cut: the test proves nothing"
    );
    wait_until(Duration::from_secs(10), "the container to be dead", || {
        b.task_status("app").as_deref() == Some("STOPPED")
    });
    share.link_up(true);
    b.remove("app");
    criu_shim_tests::assert_clean(&b, "app");
}
