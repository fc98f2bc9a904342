//! criu-sys against the real CRIU that hack/setup installs (needs root).
//!
//! The helper process is `examples/counter.rs`, built by `cargo test`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criu_sys::{open_dir, Action, Criu, Error, LogLevel, Notification, Options};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

fn criu_path() -> PathBuf {
    let p = std::env::var_os("CRIU_SHIM_CRIU")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/criu-shim/bin/criu".into());
    assert!(p.exists(), "{} missing: run hack/setup", p.display());
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (CRIU does)"
    );
    p
}

fn criu() -> Criu {
    Criu::new(criu_path()).deadline(Duration::from_secs(60))
}

fn counter_bin() -> PathBuf {
    // target/<profile>/deps/real_criu-HASH -> target/<profile>/examples/counter
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/counter");
    if !bin.exists() {
        // `cargo test` builds examples; `cargo test --test real_criu` does not.
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "criu-sys", "--example", "counter"])
            .status()
            .unwrap();
        assert!(
            status.success() && bin.exists(),
            "cannot build {}",
            bin.display()
        );
    }
    bin
}

/// A counter in its own session (CRIU dumps session leaders without --shell-job).
struct Counter {
    pid: i32,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Counter {
    fn start() -> Counter {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("count");
        let mut cmd = Command::new(counter_bin());
        cmd.arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        // Reaped by Drop (waitpid), not through the Child.
        #[allow(clippy::zombie_processes)]
        let child = cmd.spawn().unwrap();
        let c = Counter {
            pid: child.id() as i32,
            file,
            _dir: dir,
        };
        c.wait_for(|n| n >= 5);
        c
    }

    fn read(&self) -> Option<u64> {
        std::fs::read_to_string(&self.file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until the published count satisfies `ok`; returns it.
    fn wait_for(&self, ok: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(n) = self.read().filter(|n| ok(*n)) {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "count stuck at {:?}",
                self.read()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn alive(pid: i32) -> bool {
        // A zombie counts as dead.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
            Err(_) => false,
        }
    }

    fn is_counting(&self) -> bool {
        let a = self.wait_for(|_| true);
        std::thread::sleep(Duration::from_millis(100));
        self.read().unwrap() > a
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        let _ = waitpid(Pid::from_raw(self.pid), None);
    }
}

fn images() -> (tempfile::TempDir, Options) {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::new()
        .images_dir(open_dir(dir.path()).unwrap())
        .log_level(LogLevel::Info);
    (dir, opts)
}

fn has_image(dir: &Path, prefix: &str) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(prefix))
}

/// Soft-dirty tracking, checked independently of CRIU: a freshly written page
/// has bit 55 set in /proc/self/pagemap only when the kernel tracks it.
fn kernel_has_soft_dirty() -> bool {
    use std::io::{Read, Seek, SeekFrom};
    if std::fs::write("/proc/self/clear_refs", "4").is_err() {
        return false;
    }
    let mut page = vec![0u8; 4096 * 2];
    page[4096] = 1;
    let addr = (&page[4096] as *const u8 as usize) & !4095;
    let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
    f.seek(SeekFrom::Start((addr / 4096 * 8) as u64)).unwrap();
    let mut entry = [0u8; 8];
    f.read_exact(&mut entry).unwrap();
    std::hint::black_box(&page);
    u64::from_le_bytes(entry) & (1 << 55) != 0
}

#[test]
fn version_and_check_succeed() {
    let c = criu();
    let v = c.version().unwrap();
    assert!(v.version >= criu_sys::MIN_VERSION, "{v}");
    eprintln!("CRIU {v}");
    c.check().unwrap();
}

#[test]
fn feature_check_reports_this_kernel() {
    let f = criu().feature_check().unwrap();
    assert!(f.lazy_pages, "userfaultfd is enabled on these kernels");
    assert_eq!(f.mem_track, kernel_has_soft_dirty(), "{f:?}");
}

#[test]
fn dump_and_restore_continue_the_count() {
    let c = criu();
    let counter = Counter::start();
    let (dir, opts) = images();
    let opts = opts.pid(counter.pid).log_file("dump.log");
    c.dump(&opts, None).unwrap();
    // Dump without leave_running kills the tree; collect the zombie so the
    // pid is free for the restore.
    waitpid(Pid::from_raw(counter.pid), None).unwrap();
    let at_dump = counter.read().unwrap();
    assert!(has_image(dir.path(), "core-"), "no core image");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        counter.read(),
        Some(at_dump),
        "the dumped counter kept running"
    );

    let ropts = Options::new()
        .images_dir(open_dir(dir.path()).unwrap())
        .log_file("restore.log")
        .rst_sibling(true);
    let pid = c.restore(&ropts, None).unwrap();
    assert_eq!(pid, counter.pid, "restored tree keeps its pid");
    assert!(Counter::alive(pid));
    let after = counter.wait_for(|n| n > at_dump);
    assert!(
        after <= at_dump + 50,
        "count jumped from {at_dump} to {after}: not the same process state?"
    );
    assert!(counter.is_counting());
}

#[test]
fn leave_running_keeps_the_source_and_images_are_usable() {
    let c = criu();
    let counter = Counter::start();
    let (dir, opts) = images();
    c.dump(&opts.pid(counter.pid).leave_running(true), None)
        .unwrap();
    let at_dump = counter.read().unwrap();
    assert!(Counter::alive(counter.pid));
    assert!(
        counter.is_counting(),
        "source stopped counting after a leave-running dump"
    );
    assert!(has_image(dir.path(), "pages-"));

    // The images restore: stop the source, then bring the copy back.
    kill(Pid::from_raw(counter.pid), Signal::SIGKILL).unwrap();
    waitpid(Pid::from_raw(counter.pid), None).unwrap();
    let source_last = counter.read().unwrap();
    std::fs::remove_file(&counter.file).unwrap();
    let ropts = Options::new()
        .images_dir(open_dir(dir.path()).unwrap())
        .rst_sibling(true);
    let pid = c.restore(&ropts, None).unwrap();
    assert!(Counter::alive(pid));
    // The copy resumes from the dump's count (at most one step past what
    // the file said when the dump returned), behind the source's last one.
    let first = counter.wait_for(|_| true);
    assert!(
        first <= at_dump + 1 && first < source_last,
        "restored first wrote {first}; dump returned at {at_dump}; source ended at {source_last}"
    );
    assert!(counter.is_counting());
}

#[test]
fn notifications_arrive_in_order() {
    let c = criu();
    let counter = Counter::start();
    let (dir, opts) = images();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let mut cb = move |n: &mut Notification| {
        log.lock().unwrap().push(n.action.clone());
        Ok(())
    };
    c.dump(&opts.pid(counter.pid).notify_scripts(true), Some(&mut cb))
        .unwrap();
    waitpid(Pid::from_raw(counter.pid), None).unwrap();
    let dump_seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_order(&dump_seen, &[Action::PreDump, Action::PostDump]);

    let log = seen.clone();
    let mut cb = move |n: &mut Notification| {
        log.lock().unwrap().push(n.action.clone());
        Ok(())
    };
    let ropts = Options::new()
        .images_dir(open_dir(dir.path()).unwrap())
        .rst_sibling(true)
        .notify_scripts(true);
    c.restore(&ropts, Some(&mut cb)).unwrap();
    let restore_seen = seen.lock().unwrap().clone();
    assert_order(
        &restore_seen,
        &[
            Action::PreRestore,
            Action::PostRestore,
            Action::PreResume,
            Action::PostResume,
        ],
    );
    assert!(counter.is_counting());
}

fn assert_order(seen: &[Action], expected: &[Action]) {
    let mut it = seen.iter();
    for want in expected {
        assert!(
            it.any(|a| a == want),
            "{want} missing or out of order in {seen:?}"
        );
    }
}

#[test]
fn a_refusing_callback_aborts_the_dump_and_the_source_survives() {
    let c = criu();
    let counter = Counter::start();
    let (dir, opts) = images();
    let mut cb = |n: &mut Notification| match n.action {
        Action::PostDump => Err("test refuses post-dump".to_string()),
        _ => Ok(()),
    };
    let err = c
        .dump(&opts.pid(counter.pid).notify_scripts(true), Some(&mut cb))
        .unwrap_err();
    match &err {
        Error::NotifyRejected { action, reason } => {
            assert_eq!(action, "post-dump");
            assert!(reason.contains("test refuses"));
        }
        other => panic!("expected NotifyRejected, got {other}"),
    }
    assert!(
        Counter::alive(counter.pid),
        "a failed dump killed the source"
    );
    assert!(counter.is_counting());
    drop(dir);
}

#[test]
fn pre_dump_is_reported_unsupported_without_memory_tracking() {
    if kernel_has_soft_dirty() {
        eprintln!("kernel tracks soft-dirty pages: nothing to check here");
        return;
    }
    let counter = Counter::start();
    let (_dir, opts) = images();
    let err = criu().pre_dump(&opts.pid(counter.pid), None).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(
        err.to_string().contains("memory tracking not supported"),
        "{err}"
    );
    assert!(counter.is_counting());
}

#[test]
fn missing_binary_names_the_path() {
    let err = Criu::new("/no/such/dir/criu").check().unwrap_err();
    assert!(matches!(err, Error::BinaryNotFound { .. }));
    assert!(err.to_string().contains("/no/such/dir/criu"), "{err}");
}

#[test]
fn restore_from_an_empty_images_dir_carries_criu_s_reason() {
    let (_dir, opts) = images();
    let err = criu()
        .restore(&opts.log_file("restore.log"), None)
        .unwrap_err();
    let failure = err
        .criu_failure()
        .unwrap_or_else(|| panic!("not a CRIU failure: {err}"));
    assert!(!failure.log_errors.is_empty(), "no CRIU log lines in {err}");
    assert!(failure.log_path.as_ref().unwrap().ends_with("restore.log"));
    eprintln!("{err}");
}

#[test]
fn dumping_a_pid_that_does_not_exist_carries_criu_s_reason() {
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id() as i32;
    gone.wait().unwrap();
    let (_dir, opts) = images();
    let err = criu()
        .dump(&opts.pid(pid).log_file("dump.log"), None)
        .unwrap_err();
    let failure = err
        .criu_failure()
        .unwrap_or_else(|| panic!("not a CRIU failure: {err}"));
    let text = err.to_string();
    assert!(
        failure.message.is_some() || !failure.log_errors.is_empty(),
        "no reason from CRIU: {text}"
    );
    assert!(
        text.contains(&pid.to_string()) || text.contains("seize"),
        "{text}"
    );
    eprintln!("{text}");
}

#[test]
fn a_dump_past_its_deadline_is_stopped_and_the_source_keeps_running() {
    let counter = Counter::start();
    let (dir, opts) = images();
    let c = Criu::new(criu_path()).deadline(Duration::from_millis(1500));
    // Hold CRIU after it has frozen and dumped the tree, past the deadline.
    let mut cb = |n: &mut Notification| {
        if n.action == Action::PostDump {
            std::thread::sleep(Duration::from_millis(2000));
        }
        Ok(())
    };
    let started = Instant::now();
    let err = c
        .dump(&opts.pid(counter.pid).notify_scripts(true), Some(&mut cb))
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        Counter::alive(counter.pid),
        "timed-out dump killed the source"
    );
    assert!(
        counter.is_counting(),
        "source frozen after a timed-out dump"
    );
    drop(dir);
}

/// What `images` reads from real images is what the kernel said about the
/// process: its capabilities, no_new_privs, and the namespaces it shared
/// with the dumper (a plain process shares all of them).
#[test]
fn images_tell_the_dumped_process_s_credentials_and_namespaces() {
    let c = criu();
    let counter = Counter::start();
    let status = std::fs::read_to_string(format!("/proc/{}/status", counter.pid)).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    let (cap_eff, cap_bnd) = (field("CapEff:"), field("CapBnd:"));
    let (dir, opts) = images();
    c.dump(&opts.pid(counter.pid).leave_running(true), None)
        .unwrap();
    let threads = criu_sys::images::threads(dir.path()).unwrap();
    let main = threads
        .iter()
        .find(|t| t.tid == counter.pid as u32)
        .unwrap();
    let creds = main.creds.as_ref().expect("credentials recorded");
    assert_eq!(creds.effective.0, cap_eff);
    assert_eq!(creds.bounding.0, cap_bnd);
    assert_eq!(creds.uids, [0; 4]);
    assert!(!creds.no_new_privs);
    assert_eq!(main.seccomp, criu_sys::images::SeccompMode::Disabled);
    let ns = criu_sys::images::host_namespaces(dir.path()).unwrap();
    let (_, shared) = ns.iter().find(|(p, _)| *p == counter.pid as u32).unwrap();
    for kind in [
        criu_sys::images::NsKind::Pid,
        criu_sys::images::NsKind::Net,
        criu_sys::images::NsKind::Mount,
    ] {
        assert!(
            shared.contains(&kind),
            "{kind} not seen as shared: {shared:?}"
        );
    }
}

#[test]
fn images_tell_the_process_tree_and_names() {
    let c = criu();
    let counter = Counter::start();
    let (dir, opts) = images();
    c.dump(&opts.pid(counter.pid).leave_running(true), None)
        .unwrap();
    let tree = criu_sys::images::process_tree(dir.path()).unwrap();
    assert_eq!(tree[0].pid, counter.pid as u32);
    assert!(tree[0].threads.contains(&(counter.pid as u32)));
    let threads = criu_sys::images::threads(dir.path()).unwrap();
    let main = threads
        .iter()
        .find(|t| t.tid == counter.pid as u32)
        .unwrap();
    assert_eq!(main.comm.as_deref(), Some("counter"));
}

#[test]
fn every_dump_tells_which_pages_a_lazy_restore_may_serve_and_where_they_are() {
    let c = criu();
    let counter = Counter::start();
    let (dir, opts) = images();
    c.dump(
        &opts
            .pid(counter.pid)
            .log_file("dump.log")
            .leave_running(true),
        None,
    )
    .unwrap();
    let m = criu_sys::memory::task_memory(dir.path(), counter.pid as u32).unwrap();
    assert!(
        !m.ranges.is_empty(),
        "a running program has lazy heap pages"
    );
    let pages = std::fs::metadata(dir.path().join(format!("pages-{}.img", m.pages_id)))
        .unwrap()
        .len();
    for r in &m.ranges {
        assert!(
            r.offset + r.len() <= pages,
            "{r:?} beyond the {pages}-byte pages image"
        );
    }
    assert!(counter.is_counting());
}

/// A lazy dump of a fresh counter, its page server on loopback, and a
/// connection to it: the counter, the images, the dump's thread.
type LazyDump = (
    Counter,
    tempfile::TempDir,
    std::thread::JoinHandle<criu_sys::Result<()>>,
    criu_sys::page_xfer::PageClient<std::net::TcpStream>,
);

fn lazy_dump() -> LazyDump {
    let (ok, size) = criu_sys::page_xfer::pipe_max_size_suffices().unwrap();
    assert!(
        ok,
        "fs.pipe-max-size is {size}: CRIU cannot serve pages; run hack/setup (it raises it)"
    );
    let c = criu();
    let counter = Counter::start();
    let (dir, opts) = images();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = opts
        .pid(counter.pid)
        .log_file("dump.log")
        .lazy_pages(true)
        .page_server("127.0.0.1", port);
    let dumper = std::thread::spawn(move || c.dump(&o, None));
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no page server: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let client = criu_sys::page_xfer::PageClient::new(stream);
    (counter, dir, dumper, client)
}

/// Post-copy from the source: a lazy dump keeps the tree frozen and
/// serves its memory through the page server; every page that the dump's
/// pagemap leaves to the server comes back as the frozen process holds
/// it, and ending the transfer ends the dump (the tree with it). Needs
/// `fs.pipe-max-size` >= 4 MiB, which hack/setup sets (see page_xfer).
#[test]
fn a_lazy_dump_serves_the_frozen_tree_s_pages_and_ends_when_told() {
    use criu_sys::page_xfer::PAGE_SIZE;
    use std::io::{Read, Seek, SeekFrom};
    let (counter, dir, dumper, mut client) = lazy_dump();
    let m = criu_sys::memory::served_memory(dir.path(), counter.pid as u32).unwrap();
    assert!(!m.ranges.is_empty(), "no memory left to the page server");
    let mut mem = std::fs::File::open(format!("/proc/{}/mem", counter.pid)).unwrap();
    let mut moved = 0usize;
    for r in &m.ranges {
        let mut at = r.start;
        while at < r.end {
            let mut buf = vec![0u8; ((r.end - at) as usize).min(64 * PAGE_SIZE)];
            let n = client.get(counter.pid as u32, at, &mut buf).unwrap();
            let mut want = vec![0u8; n];
            mem.seek(SeekFrom::Start(at)).unwrap();
            mem.read_exact(&mut want).unwrap();
            assert!(
                buf[..n] == want[..],
                "pages at {at:#x} differ from the process's"
            );
            at += n as u64;
            moved += n;
        }
    }
    assert!(moved > 0);
    client.finish().unwrap();
    dumper.join().unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Counter::alive(counter.pid) {
        assert!(Instant::now() < deadline, "the source outlived its dump");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(dir);
}

/// A transfer called off (the client dropped unfinished: node B died)
/// fails the dump, and the source runs on: nothing is lost.
#[test]
fn a_lazy_dump_whose_peer_leaves_fails_and_the_source_runs_on() {
    let (counter, dir, dumper, mut client) = lazy_dump();
    let m = criu_sys::memory::served_memory(dir.path(), counter.pid as u32).unwrap();
    let mut page = vec![0u8; criu_sys::page_xfer::PAGE_SIZE];
    client
        .get(counter.pid as u32, m.ranges[0].start, &mut page)
        .unwrap();
    drop(client);
    assert!(dumper.join().unwrap().is_err(), "the dump succeeded");
    assert!(counter.is_counting(), "the source did not run on");
    drop(dir);
}
