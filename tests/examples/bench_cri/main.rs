//! Migration downtime through the CRI: criu-shim against containerd's own
//! Go runc shim, on the same two nodes (own network namespaces, CNI) in the
//! same run, interleaved, for counter containers of N MiB.
//!
//!   hack/bench-cri [RUNS] SIZE_MIB...
//!
//! The counters' memory is realistic records (`testapp --fill realistic`,
//! about 3.6:1 with zstd -1, like real programs'); `BENCH_FILL=random`,
//! `zero` or `pattern` chooses another kind. Each answer reads one byte of
//! every page (a simulation's step); `BENCH_TOUCH=16` makes it read 16
//! pages (a cache's lookup), which decides how soon a lazily restored copy
//! can answer.
//!
//! A client polls the service every 10 ms: the pod IP on node A, then the
//! new pod's IP on node B as soon as the CRI reports it. Downtime is the
//! time from the start of the checkpoint (the moment the state the copy
//! continues from is taken) to the first answer from node B. Also
//! reported: how long answers take before the move and for B's first ten
//! (a lazily restored copy pays for the pages its answers touch). Ways
//! compared:
//! - `criu-shim cli`: our CLI, exit mode (the source stops once the archive
//!   is on the share), pod B restores with the restore annotation;
//! - `criu-shim cri`: CRI CheckpointContainer (the kubelet checkpoint API;
//!   containerd 2.1 also writes its own tar), same restore;
//! - `criu-shim cli lazy` and `criu-shim cri lazy`: the same checkpoints,
//!   pod B restored with `criu-shim.io/migration: lazy` (it runs before
//!   its memory is on node B; pages follow as it touches them);
//! - `criu-shim cli post-copy`: our CLI's `--post-copy`: the archive on
//!   the share holds everything but the memory, pod B is restored lazily
//!   and its memory comes from node A's frozen source over the nodes'
//!   addresses; pod A is removed once its source has exited (every page
//!   moved), the time reported as "all memory on B";
//! - `criu-shim cri post-copy`: the same through CRI CheckpointContainer,
//!   pod A annotated `criu-shim.io/migration: post-copy`;
//! - `stock`: handler `runc` (containerd-shim-runc-v2): CRI
//!   CheckpointContainer to a tar on the share, pod B's container created
//!   from that tar (containerd 2.1's own CRI restore). That restore pulls
//!   the base image by digest even when the node has it, so a small
//!   registry (registry.rs) serves the test image on node B's localhost.
//!   The stock dump fails under the client ("In-flight connection": the Go
//!   shim does not skip them); it is retried, after 3 failures with the
//!   client paused, and timed from the attempt that succeeded.

mod registry;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criu_shim_tests::cri::{container_config, pod_config, Cri};
use criu_shim_tests::{http_count, http_count_within, Containerd, IMAGE};

const PORT: u16 = 8080;

/// Polls whichever address is current every 10 ms, remembering when (and
/// from which address) answers came.
struct Client {
    target: Arc<Mutex<Option<SocketAddr>>>,
    /// When each answer came, from where, and how long it took.
    answers: Arc<Mutex<Vec<(Instant, SocketAddr, Duration)>>>,
    stop: Arc<AtomicBool>,
}

impl Client {
    fn start(first: SocketAddr) -> Client {
        let c = Client {
            target: Arc::new(Mutex::new(Some(first))),
            answers: Arc::default(),
            stop: Arc::default(),
        };
        let (target, answers, stop) = (c.target.clone(), c.answers.clone(), c.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let addr = *target.lock().unwrap();
                if let Some(addr) = addr {
                    if ask(addr) {
                        let took = started.elapsed();
                        answers.lock().unwrap().push((Instant::now(), addr, took));
                    }
                }
                let spent = started.elapsed();
                if spent < Duration::from_millis(10) {
                    std::thread::sleep(Duration::from_millis(10) - spent);
                }
            }
        });
        c
    }

    /// Stops asking until the next [`Client::switch_to`].
    fn pause(&self) {
        *self.target.lock().unwrap() = None;
    }

    fn switch_to(&self, addr: SocketAddr) {
        *self.target.lock().unwrap() = Some(addr);
    }

    /// Waits for the first answer from `addr`.
    fn first_answer_from(&self, addr: SocketAddr, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((t, _, _)) = self
                .answers
                .lock()
                .unwrap()
                .iter()
                .find(|(_, a, _)| *a == addr)
            {
                return *t;
            }
            assert!(Instant::now() < deadline, "no answer from {addr}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Client {
    /// The median time to answer of `addr`'s first `n` answers (waiting
    /// for them, at most 30 s), and of every answer before the move.
    fn latencies(&self, before: SocketAddr, after: SocketAddr, n: usize) -> (Duration, Duration) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answers = self.answers.lock().unwrap();
            let of = |addr: SocketAddr| -> Vec<Duration> {
                answers
                    .iter()
                    .filter(|(_, a, _)| *a == addr)
                    .map(|(_, _, d)| *d)
                    .collect()
            };
            let mut first = of(after);
            if first.len() >= n || Instant::now() > deadline {
                first.truncate(n);
                return (median(of(before)), median(first));
            }
            drop(answers);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn ask(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_ok()
        && s.read_to_end(&mut buf).is_ok()
        && buf.starts_with(b"HTTP/1.0 200")
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    CriuCli,
    CriuCri,
    CriuCliLazy,
    CriuCriLazy,
    /// Our CLI's `--post-copy`: the memory moves from the frozen source
    /// while pod B runs (restored lazily).
    CriuPostCopy,
    /// The kubelet's checkpoint API on a pod annotated
    /// `criu-shim.io/migration: post-copy`.
    CriuCriPostCopy,
    Stock,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::CriuCli => "criu-shim cli",
            Way::CriuCri => "criu-shim cri",
            Way::CriuCliLazy => "criu-shim cli lazy",
            Way::CriuCriLazy => "criu-shim cri lazy",
            Way::CriuPostCopy => "criu-shim cli post-copy",
            Way::CriuCriPostCopy => "criu-shim cri post-copy",
            Way::Stock => "stock",
        }
    }

    fn lazy(self) -> bool {
        matches!(
            self,
            Way::CriuCliLazy | Way::CriuCriLazy | Way::CriuPostCopy | Way::CriuCriPostCopy
        )
    }

    fn post_copy(self) -> bool {
        matches!(self, Way::CriuPostCopy | Way::CriuCriPostCopy)
    }
}

struct Sample {
    /// Checkpoint attempts that failed before one succeeded.
    failed: u32,
    checkpoint: Duration,
    restore: Duration,
    downtime: Duration,
    /// From the start of the checkpoint until every page was on node B
    /// (post-copy: the source exited; otherwise the downtime, or for a lazy
    /// restore unknown here).
    all_moved: Option<Duration>,
    /// Median time to answer before the move, and of B's first 10 answers.
    latency: (Duration, Duration),
}

fn addr(ip: &str) -> SocketAddr {
    format!("{ip}:{PORT}").parse().unwrap()
}

fn remove_pod(cri: &mut Cri, pod: &str) {
    cri.stop_pod_sandbox(pod).expect("StopPodSandbox");
    cri.remove_pod_sandbox(pod).expect("RemovePodSandbox");
}

/// One migration of a `mib` MiB counter from `a` to `b`, the `way` way.
fn migrate(
    a: &Containerd,
    b: &Containerd,
    share: &std::path::Path,
    way: Way,
    mib: u64,
    run: usize,
    stock_image: &str,
) -> Sample {
    let (mut ca, mut cb) = (a.cri(), b.cri());
    let image_a = if way == Way::Stock {
        stock_image
    } else {
        IMAGE
    };
    let key = format!("bench-{mib}-{run}");
    let handler = if way == Way::Stock { "runc" } else { "criu" };
    let name = format!("counter-{run}");
    let mem = mib.to_string();
    let fill = std::env::var("BENCH_FILL").unwrap_or_else(|_| "realistic".into());
    let touch = std::env::var("BENCH_TOUCH").unwrap_or_else(|_| "all".into());
    let cmd = [
        "/testapp",
        "-m",
        mem.as_str(),
        "--fill",
        fill.as_str(),
        "--touch",
        touch.as_str(),
    ];

    let mut ann_a = vec![("criu-shim.io/checkpoint-to", key.as_str())];
    if way == Way::CriuCriPostCopy {
        ann_a.push(("criu-shim.io/migration", "post-copy"));
    }
    let pod = pod_config(&name, &format!("uid-a-{key}"), &ann_a, false);
    let pod_a = ca.run_pod_sandbox(&pod, handler).expect("pod A");
    let id_a = ca
        .create_container(&pod_a, container_config("counter", image_a, &cmd), &pod)
        .expect("container A");
    ca.start_container(&id_a).expect("start A");
    let ip_a = ca.pod_ip(&pod_a).unwrap();
    http_count_within(&ip_a, PORT, Duration::from_secs(120));
    let before = http_count(&ip_a, PORT).unwrap();
    let client = Client::start(addr(&ip_a));
    std::thread::sleep(Duration::from_millis(200));

    let tar = share.join(format!("{key}.tar"));
    let mut t0 = Instant::now();
    let mut failed = 0;
    match way {
        Way::CriuCli | Way::CriuCliLazy | Way::CriuPostCopy => {
            let extra: &[&str] = if way == Way::CriuPostCopy {
                &["--post-copy"]
            } else {
                &[]
            };
            let out = a.cli_checkpoint(&id_a, extra);
            assert!(out.status.success(), "{}", criu_shim_tests::text(&out));
        }
        Way::CriuCri | Way::CriuCriLazy | Way::CriuCriPostCopy => ca
            .checkpoint_container(&id_a, &tar)
            .expect("CheckpointContainer"),
        Way::Stock => {
            // The stock path does not skip connections caught in flight,
            // so under this client its dump fails now and then ("In-flight
            // connection"); the container goes on, and an operator would
            // retry. Timed from the attempt that succeeds.
            while let Err(e) = ca.checkpoint_container(&id_a, &tar) {
                failed += 1;
                eprintln!("stock checkpoint failed: {e}");
                if failed == 3 {
                    // As an operator would: drain the traffic, then retry.
                    client.pause();
                }
                assert!(failed < 10, "stock checkpoint keeps failing: {e}");
                let _ = std::fs::remove_file(&tar);
                t0 = Instant::now();
            }
        }
    }
    let t1 = Instant::now();
    // A post-copy source serves its memory until pod B has it all.
    if !way.post_copy() {
        remove_pod(&mut ca, &pod_a);
    }

    let restore_ann = [
        ("criu-shim.io/restore-from", key.as_str()),
        (
            "criu-shim.io/migration",
            if way.lazy() { "lazy" } else { "cold" },
        ),
    ];
    let ann: &[(&str, &str)] = if way == Way::Stock { &[] } else { &restore_ann };
    let pod = pod_config(&name, &format!("uid-b-{key}"), ann, false);
    let pod_b = cb.run_pod_sandbox(&pod, handler).expect("pod B");
    let image = if way == Way::Stock {
        tar.display().to_string()
    } else {
        IMAGE.to_string()
    };
    let id_b = cb
        .create_container(&pod_b, container_config("counter", &image, &cmd), &pod)
        .expect("container B");
    let ip_b = cb.pod_ip(&pod_b).unwrap();
    client.switch_to(addr(&ip_b));
    cb.start_container(&id_b).expect("start B");
    let t2 = client.first_answer_from(addr(&ip_b), Duration::from_secs(300));
    let latency = client.latencies(addr(&ip_a), addr(&ip_b), 10);
    drop(client);
    let all_moved = match way {
        Way::CriuPostCopy | Way::CriuCriPostCopy => {
            let exited = loop {
                let st = ca.container_status(&id_a).expect("ContainerStatus A");
                if st.state != 1 {
                    break Instant::now();
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(300),
                    "the source never exited"
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            remove_pod(&mut ca, &pod_a);
            // Where the transfer's time went, from both shims' logs.
            let logs = [a.log(), b.log()];
            if let Ok(dir) = std::env::var("BENCH_KEEP_LOGS") {
                let _ = std::fs::write(format!("{dir}/a-{mib}-{run}.log"), &logs[0]);
                let _ = std::fs::write(format!("{dir}/b-{mib}-{run}.log"), &logs[1]);
            }
            for line in logs.iter().flat_map(|l| l.lines()).filter(|l| {
                l.contains(&id_a[..12]) && l.contains("MiB served to")
                    || l.contains("MiB of memory in place")
                    || l.contains("images dumped in")
            }) {
                if let Some(msg) = line.split("msg=").nth(1) {
                    eprintln!("  # {msg}");
                }
            }
            Some(exited - t0)
        }
        Way::CriuCli | Way::CriuCri | Way::Stock => Some(t2 - t0),
        Way::CriuCliLazy | Way::CriuCriLazy => None,
    };
    let after = http_count(&ip_b, PORT).unwrap();
    assert!(
        after > before,
        "{}: state lost ({before} then {after})",
        way.name()
    );
    remove_pod(&mut cb, &pod_b);
    let _ = std::fs::remove_dir_all(share.join(criu_shim_tests::POD_TENANT).join(&key));
    let _ = std::fs::remove_file(&tar);
    Sample {
        failed,
        checkpoint: t1 - t0,
        restore: t2 - t1,
        downtime: t2 - t0,
        all_moved,
        latency,
    }
}

/// The manifest digest of `image` on `node` (`ctr images ls`).
fn manifest_digest(node: &Containerd, image: &str) -> String {
    node.ctr_ok(&["images", "ls"])
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&image)).then(|| cols[2].to_string())
        })
        .expect("the test image")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// One run for the chart, if `BENCH_SAMPLES` names a file:
/// `WAY (FILL)<TAB>MIB<TAB>DOWNTIME_MS`.
fn record_sample(label: &str, mib: u64, downtime: Duration) {
    use std::io::Write;
    let Ok(path) = std::env::var("BENCH_SAMPLES") else {
        return;
    };
    let fill = std::env::var("BENCH_FILL").unwrap_or_else(|_| "realistic".into());
    let line = format!("{label} ({fill})\t{mib}\t{}\n", ms(downtime));
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = appended {
        eprintln!("BENCH_SAMPLES={path}: {e}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (runs, sizes): (usize, Vec<u64>) = match args.first() {
        Some(r) if args.len() > 1 => (
            r.parse().expect("RUNS"),
            args[1..]
                .iter()
                .map(|s| s.parse().expect("SIZE_MIB"))
                .collect(),
        ),
        _ => (3, vec![64, 512, 2048]),
    };
    let share = tempfile::Builder::new()
        .prefix("criu-shim-bench-share-")
        .tempdir()
        .unwrap();
    // BENCH_STAGING=DIR: the shims' local staging there (a tmpfs, say);
    // each node gets its own subdirectory.
    let staging = std::env::var("BENCH_STAGING").ok();
    // Both nodes hold the cluster key: archives are signed, and post-copy
    // memory is authenticated with it.
    let secrets = tempfile::tempdir().unwrap();
    let key = secrets.path().join("cluster.key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key = key.display().to_string();
    let node = |name: &str, lock: Option<&str>| {
        let dir = staging.as_ref().map(|s| format!("{s}/{name}"));
        let mut env: Vec<(&str, &str)> = vec![("CRIU_SHIM_ARCHIVE_KEY_FILE", key.as_str())];
        if let Some(d) = dir.as_deref() {
            env.push(("CRIU_SHIM_STAGING_DIR", d));
        }
        if let Some(lock) = lock {
            env.push(("CRIU_SHIM_NETWORK_LOCK", lock));
        }
        Containerd::cri_net_node(share.path(), &env)
    };
    // BENCH_NETWORK_LOCKS=iptables,nftables: a pair of nodes per CRIU
    // network lock, each of our ways run on every pair in turn, so the
    // settings are compared interleaved, in the same run. Stock runs on
    // the first pair.
    let locks: Vec<Option<String>> = match std::env::var("BENCH_NETWORK_LOCKS") {
        Ok(v) => v.split(',').map(|l| Some(l.trim().to_string())).collect(),
        Err(_) => vec![None],
    };
    let pairs: Vec<(Option<String>, Containerd, Containerd)> = locks
        .into_iter()
        .enumerate()
        .map(|(i, lock)| {
            let a = node(&format!("a{i}"), lock.as_deref());
            let b = node(&format!("b{i}"), lock.as_deref());
            (lock, a, b)
        })
        .collect();
    let (_, a, b) = &pairs[0];
    // containerd's own CRI restore pulls the base image, by digest, even
    // though it is on the node: serve it from node B's localhost.
    let registry = registry::Registry::serve(
        criu_shim_tests::image_archive(),
        &b.net.as_ref().unwrap().netns(),
    );
    let stock_image = format!("localhost:{}/criu-shim/testapp:latest", registry.port);
    for node in [a, b] {
        node.ctr_ok(&["images", "tag", IMAGE, &stock_image]);
        let digest = manifest_digest(node, IMAGE);
        let by_digest = format!("localhost:{}/criu-shim/testapp@{digest}", registry.port);
        node.ctr_ok(&["images", "tag", IMAGE, &by_digest]);
    }
    // BENCH_WAYS=cli,cri,cli lazy,cri lazy,stock (default: all; stock
    // last, the reference).
    let wanted = std::env::var("BENCH_WAYS")
        .unwrap_or_else(|_| "cli,cri,cli lazy,cri lazy,cli post-copy,stock".into());
    let ways: Vec<Way> = [
        Way::CriuCli,
        Way::CriuCri,
        Way::CriuCliLazy,
        Way::CriuCriLazy,
        Way::CriuPostCopy,
        Way::CriuCriPostCopy,
        Way::Stock,
    ]
    .into_iter()
    .filter(|w| wanted.split(',').any(|n| w.name().ends_with(n.trim())))
    .collect();
    assert!(
        !ways.is_empty(),
        "BENCH_WAYS={wanted}: none of cli, cri, cli lazy, cri lazy, cli post-copy, cri post-copy, stock"
    );
    // Each way on each pair of nodes (stock on the first only), labelled
    // with the pair's setting when there are several.
    let variants: Vec<(Way, usize)> = ways
        .iter()
        .flat_map(|&w| {
            let on = if w == Way::Stock { 1 } else { pairs.len() };
            (0..on).map(move |p| (w, p))
        })
        .collect();
    let label = |(way, p): (Way, usize)| match &pairs[p].0 {
        Some(lock) if pairs.len() > 1 && way != Way::Stock => format!("{} [{lock}]", way.name()),
        _ => way.name().to_string(),
    };
    println!(
        "| size (MiB) | way | checkpoint (ms) | restore (ms) | downtime (ms) | downtime min..max | downtime vs stock | all memory on B (ms) | answer before / B's first 10 (ms, median) | failed checkpoints |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &mib in &sizes {
        let mut samples: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();
        for run in 0..runs {
            for (i, &(way, p)) in variants.iter().enumerate() {
                let (_, a, b) = &pairs[p];
                let s = migrate(a, b, share.path(), way, mib, run, &stock_image);
                eprintln!(
                    "{mib} MiB run {run} {}: checkpoint {} ms, restore {} ms, downtime {} ms, all memory on B {}, answers {:.1} ms before, {:.1} ms B's first 10, failed attempts {}",
                    label((way, p)),
                    ms(s.checkpoint),
                    ms(s.restore),
                    ms(s.downtime),
                    s.all_moved.map_or("-".into(), |d| format!("{} ms", ms(d))),
                    s.latency.0.as_secs_f64() * 1e3,
                    s.latency.1.as_secs_f64() * 1e3,
                    s.failed
                );
                record_sample(&label((way, p)), mib, s.downtime);
                samples[i].push(s);
            }
        }
        let downtimes: Vec<Duration> = samples
            .iter()
            .map(|s| median(s.iter().map(|x| x.downtime).collect()))
            .collect();
        let stock = downtimes[variants.len() - 1];
        for (i, &variant) in variants.iter().enumerate() {
            let s = &samples[i];
            let all_moved: Vec<Duration> = s.iter().filter_map(|x| x.all_moved).collect();
            let (lo, hi) = (
                s.iter().map(|x| x.downtime).min().unwrap_or_default(),
                s.iter().map(|x| x.downtime).max().unwrap_or_default(),
            );
            println!(
                "| {mib} | {} | {} | {} | {} | {}..{} | {:.2} | {} | {:.1} / {:.1} | {} |",
                label(variant),
                ms(median(s.iter().map(|x| x.checkpoint).collect())),
                ms(median(s.iter().map(|x| x.restore).collect())),
                ms(downtimes[i]),
                ms(lo),
                ms(hi),
                downtimes[i].as_secs_f64() / stock.as_secs_f64(),
                if all_moved.is_empty() {
                    "-".to_string()
                } else {
                    ms(median(all_moved)).to_string()
                },
                median(s.iter().map(|x| x.latency.0).collect()).as_secs_f64() * 1e3,
                median(s.iter().map(|x| x.latency.1).collect()).as_secs_f64() * 1e3,
                s.iter().map(|x| x.failed).sum::<u32>()
            );
        }
    }
}
