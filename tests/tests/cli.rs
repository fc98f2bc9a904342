//! The operators' CLI as an operator meets it: help and version, clear
//! usage errors, and `list` / `gc` on a share holding pods' archives. Runs
//! the shim binary; needs no root.

use std::path::Path;
use std::process::{Command, Output};

use criu_shim_tests::{shim_binary, text};

fn run(args: &[&str]) -> Output {
    Command::new(shim_binary())
        .args(args)
        .output()
        .expect("run the CLI")
}

#[test]
fn help_and_version_print_and_exit_0() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["checkpoint", "--help"],
        &["inspect", "--help"],
        &["list", "--help"],
        &["gc", "-h"],
        &["help", "checkpoint"],
    ] {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("Usage: containerd-shim-criu-v2"),
            "{args:?}: {stdout}"
        );
    }
    let out = run(&["checkpoint", "--help"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for flag in ["--namespace", "--to", "--leave-running", "--pod", "--level"] {
        assert!(stdout.contains(flag), "{flag} not documented: {stdout}");
    }
    for args in [&["--version"][..], &["-V"], &["version"]] {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
            "{args:?}: {}",
            text(&out)
        );
    }
}

#[test]
fn bad_usage_names_the_problem_and_exits_2() {
    let out = run(&["gc"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--keep"), "{}", text(&out));
    let out = run(&["checkpoint", "--frobnicate", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--frobnicate"), "{}", text(&out));
    let out = run(&["list", "--share", "/nonexistent/share"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
}

fn touch(share: &Path, name: &str) {
    let p = share.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, b"x").unwrap();
}

/// Pod archives live under `KEY/<container>/`: `list` shows them and `gc`
/// keeps the newest N of each container.
#[test]
fn list_and_gc_see_pod_archives() {
    let share = tempfile::tempdir().unwrap();
    let s = share.path();
    for c in ["web", "cache"] {
        for t in [
            "20260101T000000.000Z",
            "20260102T000000.000Z",
            "20260103T000000.000Z",
        ] {
            touch(s, &format!("k8s-default/job/{c}/{t}.criu.tar.zst"));
        }
    }
    touch(s, "containerd/solo/20260101T000000.000Z.criu.tar.zst");
    let share_arg = s.to_str().unwrap();
    let out = run(&["list", "--share", share_arg]);
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(listed.lines().count(), 7, "{listed}");
    assert!(
        listed.contains("k8s-default/job/web/20260103T000000.000Z.criu.tar.zst"),
        "{listed}"
    );
    let out = run(&["list", "--share", share_arg, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json.as_array().unwrap().len(), 7, "{json}");
    assert_eq!(json[0]["bytes"], 1);
    let out = run(&["list", "--share", share_arg, "k8s-default/job"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        6,
        "{}",
        text(&out)
    );

    let out = run(&["gc", "--share", share_arg, "--keep", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    for c in ["web", "cache"] {
        let left: Vec<_> = std::fs::read_dir(s.join("k8s-default/job").join(c))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            vec!["20260103T000000.000Z.criu.tar.zst".to_string()],
            "{c}"
        );
    }
    assert!(s
        .join("containerd/solo/20260101T000000.000Z.criu.tar.zst")
        .exists());
}

/// containerd's `-info` (containerd 2.2+ asks every runtime, and validates
/// recursive read-only and idmapped mounts against the answer): our name
/// and version, and runc's features, since runc runs the containers.
#[test]
fn info_reports_the_runtime_and_runc_s_features() {
    use containerd_shim_protos::protobuf::Message;
    use containerd_shim_protos::types::introspection::RuntimeInfo;
    let out = Command::new(shim_binary())
        .arg("-info")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let info = RuntimeInfo::parse_from_bytes(&out.stdout).expect("a RuntimeInfo");
    assert_eq!(info.name, "io.containerd.criu.v2");
    assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
    let features = info.features.as_ref().expect("features");
    assert_eq!(
        features.type_url,
        "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
    );
    let ours: serde_json::Value = serde_json::from_slice(&features.value).unwrap();
    let runc = Command::new("runc").arg("features").output().unwrap();
    let runc: serde_json::Value = serde_json::from_slice(&runc.stdout).unwrap();
    assert_eq!(ours, runc);
    assert!(ours["mountOptions"]
        .as_array()
        .is_some_and(|o| !o.is_empty()));
}
