//! How hostile archives are refused: time, and the most bytes written to
//! staging before the refusal. Runs the shim's own reader
//! (`containerd-shim-criu-v2 inspect`, the same unpack and verification a
//! restore uses) on archives built here as an attacker would.
//!
//!   cargo run --release -p criu-shim-tests --example bench_hostile
//!
//! Needs no root and no containerd.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest;

/// A tar member for [`archive`]: name, size, and the data (or zeros).
struct Member {
    name: String,
    size: u64,
    data: Option<Vec<u8>>,
}

fn sha(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A zstd tar of `members` then a manifest listing `listed` (path, size,
/// digest), in the older single-frame layout.
fn archive(path: &Path, members: &[Member], listed: &[(String, u64, String)]) {
    let out = std::fs::File::create(path).unwrap();
    let mut enc = zstd::stream::write::Encoder::new(out, 1).unwrap();
    enc.multithread(2).unwrap();
    let mut b = tar::Builder::new(enc);
    for m in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(m.size);
        h.set_mode(0o600);
        h.set_cksum();
        match &m.data {
            Some(d) => b.append_data(&mut h, &m.name, d.as_slice()).unwrap(),
            None => b
                .append_data(
                    &mut h,
                    &m.name,
                    std::io::Read::take(std::io::repeat(0), m.size),
                )
                .unwrap(),
        }
    }
    let manifest = serde_json::json!({
        "format": "criu-shim.checkpoint", "version": 2, "container_id": "x",
        "tenant": "containerd", "created": 0, "criu_version": "", "kernel": "",
        "shim_version": "", "compression": "zstd", "tcp_established": false,
        "stats": {"pages_bytes": 0},
        "members": listed.iter().map(|(p, s, h)| serde_json::json!({"path": p, "size": s, "sha256": h})).collect::<Vec<_>>(),
    });
    let json = serde_json::to_vec(&manifest).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(json.len() as u64);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, "manifest.json", json.as_slice())
        .unwrap();
    b.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `inspect` of `archive` with `env`; (refused?, message, seconds, peak
/// bytes in its scratch directory).
fn inspect(archive: &Path, env: &[(&str, &str)]) -> (bool, String, f64, u64) {
    let scratch = tempfile::tempdir().unwrap();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (peak, done, dir) = (peak.clone(), done.clone(), scratch.path().to_path_buf());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(dir_bytes(&dir), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let started = Instant::now();
    let out = Command::new(criu_shim_tests::shim_binary())
        .arg("inspect")
        .arg(archive)
        .env("TMPDIR", scratch.path())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (
        !out.status.success(),
        text,
        secs,
        peak.load(Ordering::SeqCst),
    )
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let at = |n: &str| -> PathBuf { dir.path().join(n) };
    let key = at("cluster.key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key = key.display().to_string();
    let inv = b"inventory".to_vec();
    let inventory = || Member {
        name: "checkpoint/inventory.img".into(),
        size: inv.len() as u64,
        data: Some(inv.clone()),
    };
    let inv_listed = (
        "checkpoint/inventory.img".to_string(),
        inv.len() as u64,
        sha(&inv),
    );

    // An 8 GiB zero bomb that says what it is (digest left bogus).
    let bomb_size = 8u64 << 30;
    let bomb = at("bomb.criu.tar.zst");
    archive(
        &bomb,
        &[
            inventory(),
            Member {
                name: "checkpoint/pages-1.img".into(),
                size: bomb_size,
                data: None,
            },
        ],
        &[
            inv_listed.clone(),
            ("checkpoint/pages-1.img".into(), bomb_size, "00".repeat(32)),
        ],
    );
    let empties = |n: usize| -> Vec<Member> {
        let mut v = vec![inventory()];
        v.extend((0..n).map(|i| Member {
            name: format!("checkpoint/e-{i}.img"),
            size: 0,
            data: Some(Vec::new()),
        }));
        v
    };
    let listed = |n: usize| -> Vec<(String, u64, String)> {
        let mut v = vec![inv_listed.clone()];
        v.extend((0..n).map(|i| (format!("checkpoint/e-{i}.img"), 0, sha(b""))));
        v
    };
    let many_listed = at("many-listed.criu.tar.zst");
    archive(&many_listed, &empties(100_001), &listed(100_001));
    let many_unlisted = at("many-unlisted.criu.tar.zst");
    archive(
        &many_unlisted,
        &empties(100_001),
        std::slice::from_ref(&inv_listed),
    );
    let fifty = at("fifty-thousand.criu.tar.zst");
    archive(&fifty, &empties(49_990), &listed(49_990));

    type Case<'a> = (&'a str, &'a Path, Vec<(&'a str, &'a str)>);
    let cases: [Case; 5] = [
        (
            "8 GiB zero bomb (unsigned), node with a cluster key",
            &bomb,
            vec![("CRIU_SHIM_ARCHIVE_KEY_FILE", key.as_str())],
        ),
        (
            "8 GiB zero bomb, no key, CRIU_SHIM_MAX_ARCHIVE_BYTES=1 GiB",
            &bomb,
            vec![("CRIU_SHIM_MAX_ARCHIVE_BYTES", "1073741824")],
        ),
        ("100,001 empty members, all listed", &many_listed, vec![]),
        (
            "100,001 empty members, unlisted (format 1 layout)",
            &many_unlisted,
            vec![],
        ),
        ("49,990 empty members, valid (accepted)", &fifty, vec![]),
    ];
    println!("| input | archive size | outcome | time | most bytes staged |");
    println!("|---|---|---|---|---|");
    for (what, path, env) in cases {
        let size = std::fs::metadata(path).unwrap().len();
        let (refused, msg, secs, peak) = inspect(path, &env);
        let outcome = if refused {
            // The cause, without the archive's temporary path.
            let why = msg
                .split_once(".criu.tar.zst ")
                .map_or(msg.as_str(), |(_, w)| w);
            why.chars().take(100).collect::<String>()
        } else {
            "accepted".into()
        };
        println!(
            "| {what} | {:.1} MiB | {outcome} | {secs:.2} s | {peak} |",
            size as f64 / (1 << 20) as f64
        );
    }
}
