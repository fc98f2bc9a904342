//! The restore path as an attacker with only "create pods" rights sees it:
//! annotations, archives and share entries are hostile, and a restore is a
//! privilege boundary. Real containerd 2.x nodes with criu-shim, runc and
//! CRIU; needs root and hack/setup.

use std::path::Path;

use criu_shim_tests::{assert_clean, text, Containerd, IMAGE, RUNTIME};

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
