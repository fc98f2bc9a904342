//! The restore path as an attacker with only "create pods" rights sees it:
//! annotations, archives and share entries are hostile, and a restore is a
//! privilege boundary. Real containerd 2.x nodes with criu-shim, runc and
//! CRIU; needs root and hack/setup.

use std::path::Path;

use criu_shim_tests::{assert_clean, text, Containerd, CTR_TENANT, IMAGE, RUNTIME};

fn share() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("criu-shim-share-")
        .tempdir()
        .unwrap()
}

/// `ctr run` of the test app restored from `reference`, with extra flags.
fn restore(node: &Containerd, id: &str, reference: &str, flags: &[&str]) -> std::process::Output {
    let ann = format!("criu-shim.io/restore-from={reference}");
    let mut args = vec!["run", "-d", "--runtime", RUNTIME, "--annotation", &ann];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[IMAGE, id]);
    node.ctr(&args)
}

/// A restore that must be refused: its error, and the node left clean.
fn refused(node: &Containerd, id: &str, reference: &str, flags: &[&str]) -> String {
    let out = restore(node, id, reference, flags);
    assert!(
        !out.status.success(),
        "restore of {id} succeeded: {}",
        text(&out)
    );
    let _ = node.ctr(&["container", "rm", id]);
    assert_clean(node, id);
    text(&out)
}

/// Finding 2: a checkpoint of a privileged container restored into an
/// unprivileged one kept every capability and no seccomp. Now refused, by
/// what the images say, with the difference named; the same archive still
/// restores into a container as privileged as its source.
#[test]
fn a_privileged_archive_is_refused_in_an_unprivileged_container() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    let b = Containerd::node(share.path(), &[]);
    a.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--privileged",
        IMAGE,
        "app",
        "/testapp",
        "-m",
        "8",
    ]);
    assert_eq!(a.count("app"), 1);
    let out = a.cli_checkpoint("app", &["--to", "priv"]);
    assert!(out.status.success(), "{}", text(&out));

    let err = refused(&b, "app", "priv", &[]);
    for part in [
        "restore refused",
        "CAP_SYS_ADMIN",
        "container spec does not",
    ] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }

    // Every capability, no seccomp, but not the host's devices: the
    // devices CRIU saved in the source's /dev are refused.
    let flags = ["--privileged", "--privileged-without-host-devices"];
    let err = refused(&b, "app1", "priv", &flags);
    assert!(err.contains("device node"), "{err}");

    // Same privileges: the archive is fine.
    let out = restore(&b, "app2", "priv", &["--privileged"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(b.count("app2"), 2, "the count continues on node B");
}

/// Finding 1: `restore-from` with an absolute path restored whatever CRIU
/// images a pod had written anywhere on the node. Annotations name archives
/// on the share; a node directory needs the operator's setting, and only
/// beneath it, without symlinks.
#[test]
fn restore_from_a_node_path_is_refused_unless_the_operator_allows_it() {
    let share = share();
    let images = tempfile::tempdir().unwrap();
    let fake = images.path().join("job");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join("inventory.img"), b"planted").unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("inventory.img"), b"planted").unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), images.path().join("link")).unwrap();

    let plain = Containerd::node(share.path(), &[]);
    let err = refused(&plain, "app", &fake.display().to_string(), &[]);
    assert!(
        err.contains("not allowed") && err.contains("CRIU_SHIM_LOCAL_IMAGES_DIR"),
        "{err}"
    );

    let dir = images.path().display().to_string();
    let operator = Containerd::node(share.path(), &[("CRIU_SHIM_LOCAL_IMAGES_DIR", &dir)]);
    let cases = [
        (elsewhere.path().to_path_buf(), "not beneath"),
        (images.path().join("link"), "symlink"),
        // Beneath and real, but not images CRIU wrote: unusable, refused.
        (fake.clone(), "restore refused"),
    ];
    for (i, (path, why)) in cases.iter().enumerate() {
        let id = format!("app{i}");
        let err = refused(&operator, &id, &path.display().to_string(), &[]);
        assert!(
            err.contains(why),
            "{}: {why:?} not in: {err}",
            path.display()
        );
    }
    assert!(Path::new(&fake).join("inventory.img").exists());
}

/// The archives under `dir` (a key's directory on the share).
fn archives_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| {
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        !n.starts_with('.') && n.ends_with(".criu.tar.zst")
    });
    v.sort();
    v
}

/// Finding 3: a pod of another namespace named the victim's key and got
/// the victim's process (its environment, its files); any pod could
/// `checkpoint-to` a victim's key. Keys now resolve inside the pod's own
/// namespace's part of the share.
#[test]
fn a_pod_cannot_restore_or_overwrite_another_namespace_s_checkpoints() {
    use criu_shim_tests::cri::{container_config, pod_config_in};
    let share = share();
    let a = Containerd::cri_net_node(share.path(), &[]);
    let b = Containerd::cri_net_node(share.path(), &[("CRIU_SHIM_FETCH_WAIT", "1")]);
    let (mut ca, mut cb) = (a.cri(), b.cri());
    let counter: &[&str] = &["/testapp", "-m", "8"];
    let run = |cri: &mut criu_shim_tests::cri::Cri, ns: &str, name: &str, ann: (&str, &str)| {
        let pod = pod_config_in(ns, name, &format!("uid-{ns}-{name}"), &[ann], false);
        let pod_id = cri.run_pod_sandbox(&pod, "criu").expect("RunPodSandbox");
        let id = cri
            .create_container(&pod_id, container_config("counter", IMAGE, counter), &pod)
            .expect("CreateContainer");
        let started = cri.start_container(&id);
        (pod_id, id, started)
    };

    // The victim, in `default`, checkpoints to `secret-job`.
    let (victim_pod, victim, started) = run(
        &mut ca,
        "default",
        "victim",
        ("criu-shim.io/checkpoint-to", "secret-job"),
    );
    started.expect("victim starts");
    criu_shim_tests::http_count_within(
        &ca.pod_ip(&victim_pod).unwrap(),
        8080,
        std::time::Duration::from_secs(30),
    );
    ca.checkpoint_container(&victim, &share.path().join("victim.tar"))
        .expect("CheckpointContainer");
    let victims = share.path().join("k8s-default/secret-job/counter");
    assert_eq!(archives_in(&victims).len(), 1);

    // Namespace `mallory` asks for the victim's key: nothing there for it.
    let (pod, id, started) = run(
        &mut cb,
        "mallory",
        "thief",
        ("criu-shim.io/restore-from", "secret-job"),
    );
    let err = started.expect_err("a restore of another namespace's key");
    assert!(
        err.contains("secret-job") && err.contains("mallory"),
        "{err}"
    );
    cb.remove_container(&id).unwrap();
    cb.stop_pod_sandbox(&pod).unwrap();
    cb.remove_pod_sandbox(&pod).unwrap();

    // And checkpoints to it: its archive goes to its own part.
    let (pod, id, started) = run(
        &mut ca,
        "mallory",
        "poisoner",
        ("criu-shim.io/checkpoint-to", "secret-job"),
    );
    started.expect("mallory's pod starts");
    criu_shim_tests::http_count_within(
        &ca.pod_ip(&pod).unwrap(),
        8080,
        std::time::Duration::from_secs(30),
    );
    ca.checkpoint_container(&id, &share.path().join("mallory.tar"))
        .expect("CheckpointContainer");
    assert_eq!(
        archives_in(&victims).len(),
        1,
        "the victim's key was written to"
    );
    assert_eq!(
        archives_in(&share.path().join("k8s-mallory/secret-job/counter")).len(),
        1
    );
    for pod in [&pod, &victim_pod] {
        ca.stop_pod_sandbox(pod).unwrap();
        ca.remove_pod_sandbox(pod).unwrap();
    }
}

/// Finding 4: `share/etcl -> /etc` made `checkpoint --to etcl/x` write
/// into /etc as root, and a symlinked key read an archive from elsewhere.
#[test]
fn symlinks_planted_on_the_share_are_refused() {
    let share = share();
    let outside = tempfile::tempdir().unwrap();
    let a = Containerd::node(share.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "8"]);
    assert_eq!(a.count("app"), 1);
    // A first, good checkpoint makes the tenant's part of the share.
    let out = a.cli_checkpoint("app", &["--to", "good", "--leave-running"]);
    assert!(out.status.success(), "{}", text(&out));
    let tenant = share.path().join(CTR_TENANT);
    std::os::unix::fs::symlink(outside.path(), tenant.join("etcl")).unwrap();

    let out = a.cli_checkpoint("app", &["--to", "etcl/x"]);
    assert!(
        !out.status.success(),
        "checkpoint through a symlink succeeded"
    );
    assert!(text(&out).contains("symlink"), "{}", text(&out));
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "something was written through the symlink"
    );
    assert_eq!(a.task_status("app").as_deref(), Some("RUNNING"));
    assert_eq!(a.count("app"), 2, "the source keeps counting");

    // A key that is a symlink to a directory holding a real archive.
    let real = archives_in(&tenant.join("good")).pop().unwrap();
    std::fs::copy(&real, outside.path().join(real.file_name().unwrap())).unwrap();
    let b = Containerd::node(share.path(), &[]);
    let err = refused(&b, "app", "etcl", &[]);
    assert!(err.contains("symlink"), "{err}");
}

/// Finding 5: staging was 0755 with images 0644 (memory and environment
/// readable by any local user); the share's directories and markers too.
#[test]
fn what_the_shim_writes_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "8"]);
    assert_eq!(a.count("app"), 1);
    let out = a.cli_checkpoint("app", &["--to", "job", "--leave-running"]);
    assert!(out.status.success(), "{}", text(&out));
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    let mut seen = 0;
    let mut stack = vec![share.path().join(CTR_TENANT)];
    while let Some(p) = stack.pop() {
        let m = mode(&p);
        if p.is_dir() {
            assert_eq!(m, 0o700, "{}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else {
            assert_eq!(m, 0o600, "{}", p.display());
        }
        seen += 1;
    }
    assert!(seen >= 4, "archive, marker and directories: {seen}");
    assert_eq!(mode(&a.staging()), 0o700);
}

/// Finding 7: an archive that unpacks to far more than it weighs filled
/// the node's disk, and 100,001 empty members took 9 minutes to refuse.
/// The limits now come from the manifest, before anything is written.
#[test]
fn archives_beyond_the_limits_are_refused_before_unpacking() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    a.run_detached("src", &["/testapp", "-m", "32"]);
    assert_eq!(a.count("src"), 1);
    let out = a.cli_checkpoint("src", &["--to", "big"]);
    assert!(out.status.success(), "{}", text(&out));
    let b = Containerd::node(
        share.path(),
        &[
            ("CRIU_SHIM_MAX_ARCHIVE_BYTES", "16777216"),
            ("CRIU_SHIM_MAX_ARCHIVE_MEMBERS", "10"),
        ],
    );
    let err = refused(&b, "app", "big", &[]);
    assert!(err.contains("more than the limit"), "{err}");
    assert!(
        err.contains("CRIU_SHIM_MAX_ARCHIVE") || err.contains("limit of"),
        "{err}"
    );
}

/// Finding 6: a digest-consistent archive whose `deleted.files` held a
/// path with a NUL panicked the shim, and with it every container of the
/// pod. Now a clear refusal, and the pod's other container runs on.
#[test]
fn a_hostile_rootfs_change_fails_one_container_not_the_pod_s_shim() {
    use sha2::Digest;
    use std::io::Read;
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    a.run_detached("src", &["/testapp", "-m", "8"]);
    assert_eq!(a.count("src"), 1);
    let out = a.cli_checkpoint("src", &["--to", "good"]);
    assert!(out.status.success(), "{}", text(&out));
    let good = archives_in(&share.path().join(CTR_TENANT).join("good"))
        .pop()
        .unwrap();

    // The same archive, `deleted.files` replaced, digests made consistent.
    let mut plain = Vec::new();
    zstd::stream::read::Decoder::new(std::fs::File::open(&good).unwrap())
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    let mut members: Vec<(String, Vec<u8>)> = Vec::new();
    for e in tar::Archive::new(plain.as_slice()).entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_dir() {
            continue;
        }
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        members.push((name, data));
    }
    let hostile = serde_json::to_vec(&["/etc/a\u{0}b"]).unwrap();
    let sha = |d: &[u8]| {
        sha2::Sha256::digest(d)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &members
            .iter()
            .find(|(n, _)| n == "manifest.json")
            .unwrap()
            .1,
    )
    .unwrap();
    // Re-tarred: the original's frame table would not fit (and is refused
    // as such); a forger leaves it out, gives every member the SHA-256 an
    // archive without frames needs, and the archive is read whole.
    manifest.as_object_mut().unwrap().remove("frames");
    for m in manifest["members"].as_array_mut().unwrap() {
        if m["path"] == "deleted.files" {
            m["size"] = hostile.len().into();
            m["sha256"] = sha(&hostile).into();
        } else if let Some((_, data)) = members.iter().find(|(n, _)| m["path"] == n.as_str()) {
            m["sha256"] = sha(data).into();
        }
    }
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in &members {
        let data = match name.as_str() {
            "deleted.files" => hostile.clone(),
            "manifest.json" => serde_json::to_vec(&manifest).unwrap(),
            _ => data.clone(),
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    let dir = share.path().join(CTR_TENANT).join("nul");
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap();
    std::fs::write(dir.join("x.criu.tar.zst"), bytes).unwrap();

    // Two containers of one "pod" share one shim.
    let node = Containerd::node(share.path(), &[]);
    let pod = "io.kubernetes.cri.sandbox-id=pod-1";
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        pod,
        IMAGE,
        "sibling",
        "/testapp",
        "-m",
        "8",
    ]);
    assert_eq!(node.count("sibling"), 1);
    let err = refused(&node, "victim", "nul", &["--annotation", pod]);
    assert!(err.contains("NUL"), "{err}");
    assert_eq!(
        node.count("sibling"),
        2,
        "the pod's other container runs on"
    );
}

/// Finding 8: a bad `checkpoint-to` was only found after the container had
/// been frozen and dumped for nothing. Now it fails first.
#[test]
fn a_bad_destination_fails_before_anything_is_frozen() {
    let share = share();
    let a = Containerd::node(share.path(), &[]);
    a.run_detached("app", &["/testapp", "-m", "8"]);
    assert_eq!(a.count("app"), 1);
    for to in ["../escape", "/etc/x", ".hidden"] {
        let out = a.cli_checkpoint("app", &["--to", to]);
        assert!(!out.status.success(), "{to}: {}", text(&out));
        assert!(
            text(&out).contains("relative path inside the share"),
            "{to}: {}",
            text(&out)
        );
    }
    assert!(
        !a.log().contains("checkpointed app"),
        "a dump ran for a refused destination"
    );
    assert_eq!(a.count("app"), 2, "the container runs on");
    assert!(criu_shim_tests::empty_dir(&a.staging()));
    // (The log line the assertion above looks for is there for a real one.)
    let out = a.cli_checkpoint("app", &["--to", "good", "--leave-running"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(a.log().contains("checkpointed app"));
}
