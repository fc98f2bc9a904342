//! Pods through containerd's CRI plugin, as the kubelet drives it, on the
//! `criu` runtime handler. Needs root and hack/setup.

use std::path::Path;
use std::time::Duration;

use criu_shim_tests::cri::{container_config, pod_config, ContainerState, Cri, PodSandboxConfig};
use criu_shim_tests::sshfs::SshfsShare;
use criu_shim_tests::{
    hash_parts, http_count, http_count_within, mounts_containing, pids_matching, wait_until,
    Containerd, SmallShare, CACHE_APP, HASH_URL, IMAGE, POD_TENANT,
};

#[test]
fn a_pod_runs_on_the_criu_handler_through_the_cri() {
    let share = tempfile::tempdir().unwrap();
    let node = Containerd::cri_node(share.path());
    let mut cri = node.cri();
    let v = cri.version().unwrap();
    assert!(v.runtime_version.starts_with('2'), "{v:?}");
    assert!(cri.image_present(IMAGE).unwrap());

    let pod = pod_config("web", "uid-web-1", &[], true);
    let pod_id = cri.run_pod_sandbox(&pod, "criu").expect("RunPodSandbox");
    let ctr = container_config("app", IMAGE, &["/testapp", "--port", "18391"]);
    let id = cri
        .create_container(&pod_id, ctr, &pod)
        .expect("CreateContainer");
    cri.start_container(&id).expect("StartContainer");
    let st = cri.container_status(&id).unwrap();
    assert_eq!(
        st.state,
        criu_shim_tests::cri::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );
    let (code, out, err) = cri
        .exec_sync(&id, &["sh", "-c", "echo from-exec; exit 4"])
        .unwrap();
    assert_eq!((code, out.as_str()), (4, "from-exec\n"), "{err}");
    // The pod's containers share one shim.
    let shims = criu_shim_tests::pids_matching(&format!("-id {pod_id}"));
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");

    cri.stop_container(&id, 5).unwrap();
    cri.remove_container(&id).unwrap();
    cri.stop_pod_sandbox(&pod_id).unwrap();
    cri.remove_pod_sandbox(&pod_id).unwrap();
}

const PORT: u16 = 8080;

/// A pod `name` on `node` with `annotations` and one container per
/// (name, args) entry; returns (pod id, container ids, pod config).
fn run_pod(
    cri: &mut Cri,
    name: &str,
    annotations: &[(&str, &str)],
    containers: &[(&str, &[&str])],
) -> Result<(String, Vec<String>, PodSandboxConfig), String> {
    let pod = pod_config(name, &format!("uid-{name}"), annotations, false);
    let pod_id = cri.run_pod_sandbox(&pod, "criu")?;
    let mut ids = Vec::new();
    for (cname, args) in containers {
        let id = cri.create_container(&pod_id, container_config(cname, IMAGE, args), &pod)?;
        cri.start_container(&id)?;
        ids.push(id);
    }
    Ok((pod_id, ids, pod))
}

fn remove_pod(cri: &mut Cri, pod_id: &str) {
    cri.stop_pod_sandbox(pod_id).expect("StopPodSandbox");
    cri.remove_pod_sandbox(pod_id).expect("RemovePodSandbox");
}

/// What a node must not keep once its pods are gone: CRI objects, mounts,
/// shims, staging, the cgroups and CNI state of `ids` (pods, containers).
fn assert_node_clean(node: &Containerd, cri: &mut Cri, ids: &[&str]) {
    for id in ids {
        let cgroup = Path::new("/sys/fs/cgroup/memory/k8s.io").join(id);
        assert!(!cgroup.exists(), "cgroup left: {}", cgroup.display());
    }
    let cni_results: Vec<_> = std::fs::read_dir("/var/lib/cni/results")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    // Named <network>-<pod sandbox id>-<interface>.
    let left: Vec<&String> = cni_results
        .iter()
        .filter(|r| ids.iter().any(|id| r.contains(id)))
        .collect();
    assert!(left.is_empty(), "CNI results left: {left:?}");
    assert!(cri.list_containers().unwrap().is_empty(), "containers left");
    assert!(cri.list_pods().unwrap().is_empty(), "pods left");
    let d = node.dir.path().display().to_string();
    wait_until(Duration::from_secs(10), "mounts to go", || {
        mounts_containing(&d).is_empty()
    });
    wait_until(Duration::from_secs(10), "shims to exit", || {
        pids_matching(&format!("-address {d}")).is_empty()
    });
    let staging: Vec<_> = std::fs::read_dir(node.staging())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(staging.is_empty(), "staging left: {staging:?}");
}

#[test]
fn a_pod_migrates_between_nodes_through_the_cri() {
    let share = tempfile::tempdir().unwrap();
    let a = Containerd::cri_net_node(share.path(), &[]);
    let b = Containerd::cri_net_node(share.path(), &[]);
    let (mut ca, mut cb) = (a.cri(), b.cri());

    let counter: &[&str] = &["/testapp", "-m", "64"];
    let (pod_a, ids_a, _) = run_pod(
        &mut ca,
        "counter",
        &[("criu-shim.io/checkpoint-to", "counter-job")],
        &[("counter", counter)],
    )
    .expect("pod on A");
    let ip_a = ca.pod_ip(&pod_a).unwrap();
    assert!(
        ip_a.starts_with(&a.net.as_ref().unwrap().pod_subnet_prefix()),
        "{ip_a}"
    );
    assert_eq!(http_count_within(&ip_a, PORT, Duration::from_secs(30)), 1);
    assert_eq!(http_count(&ip_a, PORT).unwrap(), 2);
    assert_eq!(http_count(&ip_a, PORT).unwrap(), 3);
    // The container's writable layer carries over too.
    let (code, _, err) = ca
        .exec_sync(&ids_a[0], &["sh", "-c", "echo kept > /state.txt"])
        .unwrap();
    assert_eq!(code, 0, "{err}");

    // The kubelet's checkpoint API: CRI CheckpointContainer. Our shim
    // publishes to the share because of the pod's annotation.
    let export = share.path().join("kubelet-checkpoint.tar");
    ca.checkpoint_container(&ids_a[0], &export)
        .expect("CheckpointContainer");
    assert_eq!(
        listed_archives(&share.path().join(POD_TENANT).join("counter-job/counter")),
        1
    );
    // The memory went to the share once: containerd's own export (the
    // kubelet's tar) holds the images without their 64 MiB of pages, and
    // the source ran on as soon as its state was taken, before
    // containerd's export and Resume.
    let export_bytes = std::fs::metadata(&export).unwrap().len();
    assert!(
        export_bytes < 16 << 20,
        "the kubelet's tar holds {export_bytes} bytes"
    );
    let log = a.log();
    assert!(log.contains("thawed once its state was taken"), "{log}");
    remove_pod(&mut ca, &pod_a);

    let (pod_b, ids_b, _) = run_pod(
        &mut cb,
        "counter",
        &[("criu-shim.io/restore-from", "counter-job")],
        &[("counter", counter)],
    )
    .expect("restored pod on B");
    let ip_b = cb.pod_ip(&pod_b).unwrap();
    assert_ne!(ip_a, ip_b);
    assert!(
        ip_b.starts_with(&b.net.as_ref().unwrap().pod_subnet_prefix()),
        "{ip_b}"
    );
    assert_eq!(http_count_within(&ip_b, PORT, Duration::from_secs(30)), 4);
    let st = cb.container_status(&ids_b[0]).unwrap();
    assert_eq!(st.state, ContainerState::ContainerRunning as i32, "{st:?}");
    let (code, out, err) = cb.exec_sync(&ids_b[0], &["cat", "/state.txt"]).unwrap();
    assert_eq!((code, out.as_str()), (0, "kept\n"), "{err}");
    assert_eq!(http_count(&ip_b, PORT).unwrap(), 5);

    remove_pod(&mut cb, &pod_b);
    assert_node_clean(&b, &mut cb, &[&pod_b, &ids_b[0]]);
    assert_node_clean(&a, &mut ca, &[&pod_a, &ids_a[0]]);
}

/// Lazy migration through the CRI: the kubelet's checkpoint API on A, a
/// pod on B with `criu-shim.io/migration: lazy`. B answers, the memory
/// arrives whole (its hash), the writable layer and exec work, and both
/// nodes are left clean.
#[test]
fn a_pod_migrates_lazily_through_the_cri() {
    let share = tempfile::tempdir().unwrap();
    let a = Containerd::cri_net_node(share.path(), &[]);
    let b = Containerd::cri_net_node(share.path(), &[]);
    let (mut ca, mut cb) = (a.cri(), b.cri());
    let app = CACHE_APP;
    let (pod_a, ids_a, _) = run_pod(
        &mut ca,
        "cache",
        &[("criu-shim.io/checkpoint-to", "cache-job")],
        &[("cache", app)],
    )
    .expect("pod on A");
    let ip_a = ca.pod_ip(&pod_a).unwrap();
    assert_eq!(http_count_within(&ip_a, PORT, Duration::from_secs(30)), 1);
    let hash = |cri: &mut Cri, node: &Containerd, id: &str| {
        let (code, out, err) = cri.exec_sync(id, &["wget", "-qO-", HASH_URL]).unwrap();
        let lazy: Vec<String> = node
            .log()
            .lines()
            .filter(|l| l.contains("of memory") || l.contains("level=error"))
            .map(str::to_string)
            .collect();
        assert_eq!(code, 0, "{err} {lazy:#?}");
        hash_parts(&out)
    };
    let before = hash(&mut ca, &a, &ids_a[0]);
    assert_eq!(before.len(), 2);
    let (code, _, err) = ca
        .exec_sync(&ids_a[0], &["sh", "-c", "echo kept > /state.txt"])
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let export = share.path().join("kubelet-checkpoint.tar");
    ca.checkpoint_container(&ids_a[0], &export)
        .expect("CheckpointContainer");
    remove_pod(&mut ca, &pod_a);

    let (pod_b, ids_b, _) = run_pod(
        &mut cb,
        "cache",
        &[
            ("criu-shim.io/restore-from", "cache-job"),
            ("criu-shim.io/migration", "lazy"),
        ],
        &[("cache", app)],
    )
    .expect("restored pod on B");
    let ip_b = cb.pod_ip(&pod_b).unwrap();
    assert_eq!(http_count_within(&ip_b, PORT, Duration::from_secs(30)), 2);
    let (code, out, err) = cb.exec_sync(&ids_b[0], &["cat", "/state.txt"]).unwrap();
    assert_eq!((code, out.as_str()), (0, "kept\n"), "{err}");
    assert_eq!(
        hash(&mut cb, &b, &ids_b[0]),
        before,
        "the memory did not arrive whole"
    );
    wait_until(Duration::from_secs(30), "every page in place", || {
        b.log().contains(": all 128 MiB of memory in place")
    });
    assert_eq!(http_count(&ip_b, PORT).unwrap(), 3);

    remove_pod(&mut cb, &pod_b);
    assert_node_clean(&b, &mut cb, &[&pod_b, &ids_b[0]]);
    assert_node_clean(&a, &mut ca, &[&pod_a, &ids_a[0]]);
}

/// Flips one byte in the middle of `path`.
fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_missing_or_corrupt_archive_fails_the_container_and_leaves_the_node_clean() {
    let share = tempfile::tempdir().unwrap();
    let a = Containerd::cri_net_node(share.path(), &[]);
    // A missing archive is waited for (it may be on its way), then refused.
    let b = Containerd::cri_net_node(share.path(), &[("CRIU_SHIM_FETCH_WAIT", "2")]);
    let (mut ca, mut cb) = (a.cri(), b.cri());
    let counter: &[&str] = &["/testapp", "-m", "16"];

    // A good archive, then a copy of it with one byte flipped.
    let (pod_a, ids_a, _) = run_pod(
        &mut ca,
        "counter",
        &[("criu-shim.io/checkpoint-to", "good")],
        &[("counter", counter)],
    )
    .expect("pod on A");
    http_count_within(&ca.pod_ip(&pod_a).unwrap(), PORT, Duration::from_secs(30));
    ca.checkpoint_container(&ids_a[0], &share.path().join("export.tar"))
        .expect("CheckpointContainer");
    let good = std::fs::read_dir(share.path().join(POD_TENANT).join("good/counter"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".criu.tar.zst"))
        .expect("the published archive");
    let bad_dir = share.path().join(POD_TENANT).join("bad/counter");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let bad = bad_dir.join(good.file_name().unwrap());
    std::fs::copy(&good, &bad).unwrap();
    corrupt(&bad);

    let mut ids = Vec::new();
    for (key, cause) in [
        ("missing", "no archive under missing/counter/ on the share"),
        ("bad", "bad/counter/"),
    ] {
        let pod = pod_config(
            key,
            &format!("uid-{key}"),
            &[("criu-shim.io/restore-from", key)],
            false,
        );
        let pod_id = cb.run_pod_sandbox(&pod, "criu").expect("RunPodSandbox");
        let id = cb
            .create_container(&pod_id, container_config("counter", IMAGE, counter), &pod)
            .expect("CreateContainer");
        // containerd creates the task (and so our restore) at StartContainer.
        let err = cb
            .start_container(&id)
            .expect_err("a restore from a bad archive");
        eprintln!("{key}: StartContainer: {err}");
        assert!(
            err.contains(cause),
            "{key}: the error names the archive: {err}"
        );
        let st = cb.container_status(&id).unwrap();
        assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
        assert!(
            st.message.contains(cause),
            "{key}: ContainerStatus says why: {st:?}"
        );
        if key == "bad" {
            assert!(
                err.contains("checksum") || err.contains("digest") || err.contains("corrupt"),
                "the error says the archive is damaged: {err}"
            );
        }
        cb.remove_container(&id).expect("RemoveContainer");
        remove_pod(&mut cb, &pod_id);
        ids.push(pod_id);
        ids.push(id);
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_node_clean(&b, &mut cb, &ids);
    // The archives on the share are untouched by the failed restores.
    assert!(good.is_file() && bad.is_file());
    remove_pod(&mut ca, &pod_a);
}

/// A container config with a host directory mounted at `/data`.
fn with_volume(
    mut c: criu_shim_tests::cri::ContainerConfig,
    host: &Path,
) -> criu_shim_tests::cri::ContainerConfig {
    c.mounts.push(criu_shim_tests::cri::Mount {
        container_path: "/data".into(),
        host_path: host.display().to_string(),
        ..Default::default()
    });
    c
}

#[test]
fn a_two_container_pod_migrates_with_both_states_through_a_pod_checkpoint() {
    let share = tempfile::tempdir().unwrap();
    let a = Containerd::cri_net_node(share.path(), &[]);
    let b = Containerd::cri_net_node(share.path(), &[]);
    let (mut ca, mut cb) = (a.cri(), b.cri());
    // The pod's volume lives where both nodes see it (a network volume).
    let volume = share.path().join("volumes/duo");
    std::fs::create_dir_all(&volume).unwrap();
    let containers = [
        ("counter", vec!["/testapp", "-m", "32", "--port", "8080"]),
        ("sidecar", vec!["/testapp", "--port", "8081"]),
    ];
    let start_pod = |cri: &mut Cri, annotation: (&str, &str)| {
        let pod = pod_config("duo", "uid-duo", &[annotation], false);
        let pod_id = cri.run_pod_sandbox(&pod, "criu")?;
        let mut ids = Vec::new();
        for (name, args) in &containers {
            let config = with_volume(container_config(name, IMAGE, args), &volume);
            let id = cri.create_container(&pod_id, config, &pod)?;
            cri.start_container(&id)?;
            ids.push(id);
        }
        Ok::<_, String>((pod_id, ids))
    };

    let (pod_a, ids_a) = start_pod(&mut ca, ("criu-shim.io/checkpoint-to", "duo-job")).unwrap();
    let ip_a = ca.pod_ip(&pod_a).unwrap();
    for _ in 0..3 {
        http_count_within(&ip_a, 8080, Duration::from_secs(30));
    }
    for _ in 0..2 {
        http_count_within(&ip_a, 8081, Duration::from_secs(30));
    }
    let (code, _, err) = ca
        .exec_sync(&ids_a[1], &["sh", "-c", "echo from-sidecar > /data/note"])
        .unwrap();
    assert_eq!(code, 0, "{err}");

    // A pod checkpoint that leaves the pod running: both containers go on.
    // Named the way an operator knows it: the pod's namespace and name.
    let out = a.cli_checkpoint(
        "default/duo",
        &["--pod", "--leave-running", "--to", "duo-warm"],
    );
    assert!(out.status.success(), "{}", criu_shim_tests::text(&out));
    assert_eq!(http_count(&ip_a, 8080).unwrap(), 4);
    assert_eq!(
        listed_archives(&share.path().join(POD_TENANT).join("duo-warm/sidecar")),
        1
    );

    // Our CLI, naming either container: the whole pod, frozen together,
    // stopped once both archives are on the share.
    // (by the short id `crictl ps` prints)
    let out = a.cli_checkpoint(&ids_a[0][..13], &["--pod"]);
    assert!(out.status.success(), "{}", criu_shim_tests::text(&out));
    assert!(
        a.log().contains("froze 2 containers"),
        "both frozen before the dumps"
    );
    for name in ["counter", "sidecar"] {
        let n = listed_archives(&share.path().join(POD_TENANT).join("duo-job").join(name));
        assert_eq!(n, 1, "one archive for {name}");
    }
    for id in &ids_a {
        wait_until(
            Duration::from_secs(10),
            "the source containers to stop",
            || ca.container_status(id).unwrap().state == ContainerState::ContainerExited as i32,
        );
    }
    remove_pod(&mut ca, &pod_a);

    let (pod_b, ids_b) = start_pod(&mut cb, ("criu-shim.io/restore-from", "duo-job")).unwrap();
    let ip_b = cb.pod_ip(&pod_b).unwrap();
    assert_eq!(http_count_within(&ip_b, 8080, Duration::from_secs(30)), 5);
    assert_eq!(http_count(&ip_b, 8081).unwrap(), 3);
    for id in &ids_b {
        let st = cb.container_status(id).unwrap();
        assert_eq!(st.state, ContainerState::ContainerRunning as i32, "{st:?}");
    }
    let (code, out, err) = cb.exec_sync(&ids_b[0], &["cat", "/data/note"]).unwrap();
    assert_eq!((code, out.as_str()), (0, "from-sidecar\n"), "{err}");

    remove_pod(&mut cb, &pod_b);
    let mut ids: Vec<&str> = vec![&pod_b];
    ids.extend(ids_b.iter().map(String::as_str));
    assert_node_clean(&b, &mut cb, &ids);
    let mut ids: Vec<&str> = vec![&pod_a];
    ids.extend(ids_a.iter().map(String::as_str));
    assert_node_clean(&a, &mut ca, &ids);
}

/// The archives a directory listing shows (as a node's mount sees it).
fn listed_archives(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".criu.tar.zst"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_pod_migrates_over_an_sshfs_share_whose_listings_are_stale() {
    let share = SshfsShare::start(2);
    let a = Containerd::cri_net_node(share.mount_point(0), &[]);
    let b = Containerd::cri_net_node(share.mount_point(1), &[]);
    let (mut ca, mut cb) = (a.cri(), b.cri());
    let counter: &[&str] = &["/testapp", "-m", "32"];
    let (pod_a, ids_a, _) = run_pod(
        &mut ca,
        "counter",
        &[("criu-shim.io/checkpoint-to", "job")],
        &[("counter", counter)],
    )
    .expect("pod on A");
    let ip_a = ca.pod_ip(&pod_a).unwrap();
    assert_eq!(http_count_within(&ip_a, PORT, Duration::from_secs(30)), 1);

    // A first checkpoint, which node B's mount lists (and caches).
    ca.checkpoint_container(&ids_a[0], &share.dir.path().join("export-1.tar"))
        .expect("CheckpointContainer");
    let on_b = share.mount_point(1).join(POD_TENANT).join("job/counter");
    assert_eq!(listed_archives(&on_b), 1);

    // More state, and the real move: exit-mode checkpoint with our CLI.
    assert_eq!(http_count(&ip_a, PORT).unwrap(), 2);
    assert_eq!(http_count(&ip_a, PORT).unwrap(), 3);
    let out = a.cli_checkpoint(&ids_a[0], &[]);
    assert!(out.status.success(), "{}", criu_shim_tests::text(&out));
    assert_eq!(
        listed_archives(&share.export().join(POD_TENANT).join("job/counter")),
        2
    );
    let stale = listed_archives(&on_b) == 1;
    eprintln!("node B's listing of the key is stale: {stale}");
    assert!(
        stale,
        "sshfs caches listings (120 s here): this test relies on it"
    );
    remove_pod(&mut ca, &pod_a);

    // B restores the newest archive although its listing still shows only
    // the first one: the count goes on from 3, not from 1.
    let (pod_b, ids_b, _) = run_pod(
        &mut cb,
        "counter",
        &[("criu-shim.io/restore-from", "job")],
        &[("counter", counter)],
    )
    .expect("restored pod on B");
    let ip_b = cb.pod_ip(&pod_b).unwrap();
    assert_eq!(http_count_within(&ip_b, PORT, Duration::from_secs(30)), 4);
    let (code, _, err) = cb.exec_sync(&ids_b[0], &["true"]).unwrap();
    assert_eq!(code, 0, "{err}");

    // Nothing half-written on the server.
    let hidden: Vec<String> =
        std::fs::read_dir(share.export().join(POD_TENANT).join("job/counter"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".partial-") || n.starts_with(".seq-new"))
            .collect();
    assert!(hidden.is_empty(), "leftovers on the share: {hidden:?}");
    remove_pod(&mut cb, &pod_b);
    assert_node_clean(&b, &mut cb, &[&pod_b, &ids_b[0]]);
}

#[test]
fn a_pod_under_load_is_checkpointed_and_restored() {
    let share = tempfile::tempdir().unwrap();
    let a = Containerd::cri_net_node(share.path(), &[]);
    let b = Containerd::cri_net_node(share.path(), &[]);
    let (mut ca, mut cb) = (a.cri(), b.cri());
    let counter: &[&str] = &["/testapp", "-m", "16"];
    let (pod_a, ids_a, _) = run_pod(
        &mut ca,
        "busy",
        &[("criu-shim.io/checkpoint-to", "busy")],
        &[("counter", counter)],
    )
    .expect("pod on A");
    let ip_a = ca.pod_ip(&pod_a).unwrap();
    http_count_within(&ip_a, PORT, Duration::from_secs(30));

    // Clients keep connecting while the pod is dumped: connections are
    // caught half-open and established (the stock shim's dump fails here).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ip) = (stop.clone(), ip_a.clone());
            std::thread::spawn(move || {
                let mut last = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(n) = http_count(&ip, PORT) {
                        last = last.max(n);
                    }
                }
                last
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = a.cli_checkpoint(&ids_a[0], &[]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = load.into_iter().map(|t| t.join().unwrap()).max().unwrap();
    assert!(out.status.success(), "{}", criu_shim_tests::text(&out));
    assert!(seen > 10, "the load was real: {seen} requests");
    remove_pod(&mut ca, &pod_a);

    let (pod_b, _, _) = run_pod(
        &mut cb,
        "busy",
        &[("criu-shim.io/restore-from", "busy")],
        &[("counter", counter)],
    )
    .expect("restored pod on B");
    let ip_b = cb.pod_ip(&pod_b).unwrap();
    let next = http_count_within(&ip_b, PORT, Duration::from_secs(30));
    // Every answer the clients got came from state the copy continues.
    assert!(
        next > seen,
        "restored count {next} after {seen} answered on A"
    );
    assert!(
        next <= seen + 5,
        "restored count {next}: from an older state than {seen}?"
    );
    remove_pod(&mut cb, &pod_b);
}

#[test]
fn a_pod_checkpoint_that_fails_half_way_publishes_nothing_and_the_pod_runs_on() {
    // A 2 MiB share: the first container's archive fits (its memory
    // compresses to nothing, and every chunk is compressed: the share is
    // faster than the compressor, so `auto` would store them), the
    // second's 16 MiB of random memory does not.
    let share = SmallShare::mount("2m");
    let a = Containerd::cri_net_node(share.path(), &[("CRIU_SHIM_COMPRESSION", "zstd")]);
    let mut ca = a.cri();
    let (pod, ids, _) = run_pod(
        &mut ca,
        "half",
        &[("criu-shim.io/checkpoint-to", "half")],
        &[
            ("a-small", &["/testapp", "-m", "8", "--port", "8080"]),
            (
                "b-random",
                &["/testapp", "-m", "16", "--random", "--port", "8081"],
            ),
        ],
    )
    .expect("pod");
    let ip = ca.pod_ip(&pod).unwrap();
    assert_eq!(http_count_within(&ip, 8080, Duration::from_secs(30)), 1);
    assert_eq!(http_count_within(&ip, 8081, Duration::from_secs(30)), 1);

    let out = a.cli_checkpoint(&ids[0], &["--pod"]);
    assert!(
        !out.status.success(),
        "16 MiB of random memory fit a 2 MiB share?"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no space left"),
        "the error names the cause: {err}"
    );
    // a-small was published first and taken back with its marker: the
    // pod's key holds nothing a restore could pick up.
    let log = a.log();
    assert!(
        log.contains("taking back") && log.contains("half/a-small/"),
        "a-small's archive was published, then taken back"
    );
    for name in ["a-small", "b-random"] {
        let left: Vec<_> = std::fs::read_dir(share.path().join(POD_TENANT).join("half").join(name))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{name}: left on the share: {left:?}");
    }
    // Both containers were thawed and keep their state.
    assert_eq!(http_count(&ip, 8080).unwrap(), 2);
    assert_eq!(http_count(&ip, 8081).unwrap(), 2);
    for id in &ids {
        let st = ca.container_status(id).unwrap();
        assert_eq!(st.state, ContainerState::ContainerRunning as i32, "{st:?}");
    }
    remove_pod(&mut ca, &pod);
    let mut all: Vec<&str> = vec![&pod];
    all.extend(ids.iter().map(String::as_str));
    assert_node_clean(&a, &mut ca, &all);
}

#[test]
fn the_kubelet_checkpoint_api_checkpoints_a_whole_pod_when_annotated() {
    let share = tempfile::tempdir().unwrap();
    let a = Containerd::cri_net_node(share.path(), &[]);
    let b = Containerd::cri_net_node(share.path(), &[]);
    let (mut ca, mut cb) = (a.cri(), b.cri());
    let containers: [(&str, &[&str]); 2] = [
        ("web", &["/testapp", "--port", "8080"]),
        ("cache", &["/testapp", "-m", "16", "--port", "8081"]),
    ];
    let (pod_a, ids_a, _) = run_pod(
        &mut ca,
        "whole",
        &[
            ("criu-shim.io/checkpoint-to", "whole"),
            ("criu-shim.io/checkpoint-pod", "true"),
        ],
        &containers,
    )
    .expect("pod on A");
    let ip_a = ca.pod_ip(&pod_a).unwrap();
    assert_eq!(http_count_within(&ip_a, 8080, Duration::from_secs(30)), 1);
    assert_eq!(http_count_within(&ip_a, 8081, Duration::from_secs(30)), 1);
    assert_eq!(http_count(&ip_a, 8081).unwrap(), 2);

    // The kubelet names one container; the pod is checkpointed whole.
    let export = share.path().join("web.tar");
    ca.checkpoint_container(&ids_a[0], &export)
        .expect("CheckpointContainer");
    assert!(
        export.is_file(),
        "containerd still gets its checkpoint of web"
    );
    assert!(a.log().contains("froze 2 containers"), "frozen together");
    for name in ["web", "cache"] {
        let dir = share.path().join(POD_TENANT).join("whole").join(name);
        assert_eq!(listed_archives(&dir), 1, "{name}");
        // Operators' tools read what the kubelet path published.
        let archive = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".criu.tar.zst"))
            .unwrap();
        let (show, inspect) = criu_shim_tests::checkpointctl_reads(&archive);
        for part in [name, IMAGE, "io.containerd.criu.v2"] {
            assert!(
                show.contains(part),
                "{part:?} not in checkpointctl show: {show}"
            );
        }
        assert!(
            inspect.contains("Checkpointed") && inspect.contains("testapp"),
            "{inspect}"
        );
    }
    remove_pod(&mut ca, &pod_a);

    let (pod_b, _, _) = run_pod(
        &mut cb,
        "whole",
        &[("criu-shim.io/restore-from", "whole")],
        &containers,
    )
    .expect("restored pod on B");
    let ip_b = cb.pod_ip(&pod_b).unwrap();
    assert_eq!(http_count_within(&ip_b, 8080, Duration::from_secs(30)), 2);
    assert_eq!(http_count(&ip_b, 8081).unwrap(), 3);
    remove_pod(&mut cb, &pod_b);
}

#[test]
fn a_restarted_container_of_a_restored_pod_resumes_from_the_archive_again() {
    let share = tempfile::tempdir().unwrap();
    let a = Containerd::cri_net_node(share.path(), &[]);
    let mut ca = a.cri();
    let counter: &[&str] = &["/testapp"];
    let (pod, ids, _) = run_pod(
        &mut ca,
        "src",
        &[("criu-shim.io/checkpoint-to", "resume")],
        &[("counter", counter)],
    )
    .expect("source pod");
    let ip = ca.pod_ip(&pod).unwrap();
    assert_eq!(http_count_within(&ip, PORT, Duration::from_secs(30)), 1);
    assert_eq!(http_count(&ip, PORT).unwrap(), 2);
    let out = a.cli_checkpoint(&ids[0], &[]);
    assert!(out.status.success(), "{}", criu_shim_tests::text(&out));
    remove_pod(&mut ca, &pod);

    let (pod, ids, config) = run_pod(
        &mut ca,
        "dst",
        &[("criu-shim.io/restore-from", "resume")],
        &[("counter", counter)],
    )
    .expect("restored pod");
    let ip = ca.pod_ip(&pod).unwrap();
    assert_eq!(http_count_within(&ip, PORT, Duration::from_secs(30)), 3);
    assert_eq!(http_count(&ip, PORT).unwrap(), 4);
    // The kubelet restarts the container (attempt 1), as after a crash.
    ca.stop_container(&ids[0], 5).unwrap();
    ca.remove_container(&ids[0]).unwrap();
    let mut again = container_config("counter", IMAGE, counter);
    again.metadata.as_mut().unwrap().attempt = 1;
    let id = ca
        .create_container(&pod, again, &config)
        .expect("CreateContainer");
    ca.start_container(&id).expect("StartContainer");
    assert_eq!(
        http_count_within(&ip, PORT, Duration::from_secs(30)),
        3,
        "resumed from the archive, not from scratch (1) nor from before the restart (5)"
    );
    remove_pod(&mut ca, &pod);
}
