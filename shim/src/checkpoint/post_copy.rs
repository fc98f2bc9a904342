//! Post-copy checkpoints: the source's side.
//!
//! A cold checkpoint writes every page to the share while the container
//! is frozen, so its downtime grows with its memory. A post-copy one
//! (`checkpoint --post-copy`) publishes only what is not private memory
//! and leaves the memory with the frozen source, served to the restoring
//! node on demand. Downtime is the dump of everything but memory plus the
//! restore: flat, whatever the memory's size.
//!
//! 1. Refused up front unless the node has a cluster key (pages are
//!    secrets), a relay address (`CRIU_SHIM_POST_COPY_ADDRESS`) and a pipe
//!    size CRIU's page server can use; the relay's port is bound before
//!    anything is frozen.
//! 2. runc dumps with `--lazy-pages` and CRIU's page server on loopback;
//!    the dump stays open, the tasks frozen. We connect to that server at
//!    once: it serves one connection, ours.
//! 3. The images (all but the lazy memory) are published as any archive
//!    (signed, tenant-bound, atomic), the manifest naming the relay and a
//!    fresh session id.
//! 4. The relay (a thread; the Checkpoint RPC has returned) waits for the
//!    restoring node, authenticates it ([`crate::page_stream`]) and
//!    forwards its requests to CRIU, only those inside the runs the dump
//!    left to the page server (anything else would crash CRIU).
//! 5. "Done": CRIU ends the dump and kills the source; runc removes it and
//!    the task exits. Anything else (the restorer silent past
//!    `CRIU_SHIM_POST_COPY_IDLE_TIMEOUT`, gone, refused, a CRIU error):
//!    the transfer is called off, which fails the dump, and CRIU thaws the
//!    tasks: the source runs on. Never just a closed connection: CRIU
//!    takes that for success and kills the tasks.
//!
//! Either way the archive is removed from the share afterwards: without
//! its source it can never be restored again.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criu_sys::memory::{served_memory, TaskMemory};
use criu_sys::page_xfer::{self, PageClient};

use super::{publish, CheckpointRequest, Destination, Writing};
use crate::container::{Container, DumpStats};
use crate::error::{Error, Result};
use crate::messages::{FileMessage, PostCopyEnd, ProgressReport};
use crate::migrate::manifest::PageSourceRef;
use crate::migrate::{self, stage::Staging, Report};
use crate::page_stream::{self, Answer, Request, SessionId, MAX_PAGES, PAGE_SIZE};
use crate::process::Status;
use criu_shim_config::env;
use std::sync::atomic::Ordering;

/// How long a connection may take to prove it holds the cluster key.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long CRIU has to start its page server once runc runs.
const PAGE_SERVER_WAIT: Duration = Duration::from_secs(60);
/// How often progress is logged, and shown to a waiting CLI.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
const SHOW_EVERY: Duration = Duration::from_millis(250);

/// Who asked for a post-copy checkpoint, and what they get besides.
#[derive(Default)]
pub struct Asked {
    /// Our CLI's directory: the transfer's progress and its end are
    /// written there (`--wait`).
    pub progress: Option<PathBuf>,
    /// containerd's images directory (the kubelet's checkpoint API, which
    /// paused the container for us): it gets the images, none of which
    /// holds memory, for its own export.
    pub handover: Option<PathBuf>,
}

/// A post-copy checkpoint of `c`: returns once the archive of everything
/// but its memory is published; the memory follows through the relay.
pub(super) fn checkpoint(
    c: &Arc<Container>,
    r: &CheckpointRequest,
    to: Destination,
    asked: Asked,
) -> Result<Report> {
    if r.leave_running {
        return Err(Error::InvalidArgument(
            "post-copy moves the container (the source exits once its memory has moved); \
             it cannot also leave it running"
                .into(),
        ));
    }
    let key = to.mac_key.clone().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "post-copy serves the container's memory over the network, authenticated with \
             the cluster key, and this node has none: set {} on every node",
            env::ARCHIVE_KEY_FILE
        ))
    })?;
    let address = c.config.post_copy_address.ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "post-copy needs the address the restoring node reaches this one at: set {} \
             (this node's IP, optionally :PORT)",
            env::POST_COPY_ADDRESS
        ))
    })?;
    check_pipe_size()?;
    // Before anything is frozen: a lazy restore's pages must all be in.
    c.memory_in_place(Duration::from_secs(c.config.criu_timeout_secs))?;
    let listener = TcpListener::bind(address).map_err(|e| {
        Error::FailedPrecondition(format!(
            "cannot listen on {address} ({}) for the restoring node: {e}",
            env::POST_COPY_ADDRESS
        ))
    })?;
    let advertised = SocketAddr::new(
        address.ip(),
        listener
            .local_addr()
            .map_err(|e| Error::io("relay address", e))?
            .port(),
    );
    let criu_port = free_loopback_port()?;
    let staging = Staging::new(&c.config.staging_dir, &format!("dump-{}", c.id))?;
    let mut args = r.staged_args(&staging);
    args.leave_running = false;
    args.lazy_pages = true;
    args.page_server = Some(format!("127.0.0.1:{criu_port}"));

    let started = Instant::now();
    let moving = MovingOut::start(c, asked.handover.is_some())?;
    let dump = start_dump(c, args.clone())?;
    let criu = match connect_page_server(criu_port, &dump) {
        Ok(s) => PageClient::new(s),
        Err(e) => {
            wait_for_dump(c, &dump);
            moving.called_off();
            return Err(e);
        }
    };
    let dumped_in = started.elapsed();
    // From here on, any failure calls the transfer off: CRIU fails the
    // dump and the container runs on.
    let published = (|| {
        if let Some(dir) = &asked.handover {
            super::hand_over(&args.image_path, dir)?;
        }
        let memory = served(&args.image_path)?;
        let session = page_stream::new_session().map_err(|e| Error::io("session id", e))?;
        let how = Writing {
            page_source: Some(PageSourceRef {
                address: advertised,
                session: page_stream::session_hex(&session),
            }),
            ..Writing::after_dump(r.compression(c.config.compression), None)
        };
        let report = publish(c, &args, &DumpStats::default(), &to, how)?;
        Ok((report, memory, session))
    })();
    let (report, memory, session) = match published {
        Ok(p) => p,
        Err(e) => {
            drop(criu);
            wait_for_dump(c, &dump);
            moving.called_off();
            return Err(e);
        }
    };
    log::info!(
        "post-copy of {}: images dumped in {dumped_in:?}, published in {:?}; {} MiB of \
         memory wait for the restoring node at {advertised}",
        c.id,
        report.publish_time,
        memory.values().map(TaskMemory::bytes).sum::<u64>() >> 20
    );
    let relay = Relay {
        moving,
        listener,
        criu: Some(criu),
        key,
        session,
        memory,
        dump,
        idle: Duration::from_secs(c.config.post_copy_idle_secs),
        archive: report.clone(),
        progress: asked.progress,
        _staging: staging,
    };
    let froze = relay.moving.froze;
    let spawned = std::thread::Builder::new()
        .name(format!("post-copy-{}", c.id))
        .spawn(move || relay.run());
    if let Err(e) = spawned {
        // The relay went with the closure: CRIU's connection was dropped,
        // which calls the dump off.
        MovingOut {
            c: c.clone(),
            froze,
        }
        .called_off();
        migrate::unpublish(&report);
        return Err(Error::Other(format!(
            "no thread for the post-copy relay: {e}"
        )));
    }
    Ok(report)
}

fn check_pipe_size() -> Result<()> {
    match page_xfer::pipe_max_size_suffices() {
        Ok((true, _)) => Ok(()),
        Ok((false, size)) => Err(Error::FailedPrecondition(format!(
            "fs.pipe-max-size is {size}: CRIU's page server needs {} to serve memory \
             (without CAP_SYS_RESOURCE); run `sysctl fs.pipe-max-size={}` (hack/setup does)",
            page_xfer::PIPE_MAX_SIZE_NEEDED,
            page_xfer::PIPE_MAX_SIZE_NEEDED
        ))),
        Err(e) => Err(Error::io("read fs.pipe-max-size", e)),
    }
}

fn free_loopback_port() -> Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io("find a loopback port for CRIU's page server", e))
}

type DumpResult = Result<DumpStats>;

/// runc's lazy dump, in its own thread: it returns only when the
/// transfer ends.
fn start_dump(c: &Arc<Container>, args: crate::runc::CriuArgs) -> Result<Receiver<DumpResult>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let c = c.clone();
    std::thread::Builder::new()
        .name(format!("lazy-dump-{}", c.id))
        .spawn(move || {
            let _ = tx.send(c.checkpoint(&args, &[]));
        })
        .map_err(|e| Error::Other(format!("no thread for the dump: {e}")))?;
    Ok(rx)
}

/// Connects to CRIU's page server as soon as it listens (the images are
/// all written by then). It serves one connection: ours, unless another
/// process on this node raced us to it, which then fails the checkpoint.
fn connect_page_server(port: u16, dump: &Receiver<DumpResult>) -> Result<TcpStream> {
    let deadline = Instant::now() + PAGE_SERVER_WAIT;
    loop {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if e.kind() != ErrorKind::ConnectionRefused => {
                return Err(Error::io("connect to CRIU's page server", e))
            }
            Err(_) => {}
        }
        match dump.recv_timeout(Duration::from_millis(2)) {
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) => {
                return Err(Error::Other(
                    "the lazy dump ended before its page server served anything".into(),
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::Other("the dump thread went away".into()))
            }
            Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                return Err(Error::DeadlineExceeded(format!(
                    "CRIU's page server did not listen within {PAGE_SERVER_WAIT:?}"
                )))
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// After the transfer was called off: the dump fails and the container
/// runs on (Container::checkpoint undoes what the dump left).
fn wait_for_dump(c: &Container, dump: &Receiver<DumpResult>) {
    let limit = Duration::from_secs(c.config.criu_timeout_secs + 30);
    match dump.recv_timeout(limit) {
        Ok(Err(e)) => log::info!(
            "{}: the dump was called off ({e}); the container runs on",
            c.id
        ),
        Ok(Ok(_)) => log::warn!("{}: the dump ended although it was called off", c.id),
        Err(_) => log::error!(
            "{}: runc's checkpoint did not return within {limit:?}",
            c.id
        ),
    }
}

/// The container frozen and marked as moving out for the transfer: our
/// freezing spares CRIU's own, which polls the freezer in 100 ms steps.
struct MovingOut {
    c: Arc<Container>,
    /// We froze it (else the user had paused it, and paused it stays).
    froze: bool,
}

impl MovingOut {
    /// `paused_for_us`: containerd paused it for this checkpoint (and its
    /// Resume, which comes while the memory moves, is refused).
    fn start(c: &Arc<Container>, paused_for_us: bool) -> Result<MovingOut> {
        let running = c.init.status() == Status::Running;
        if running {
            c.pause()?;
        }
        let froze = running || paused_for_us;
        c.moving_out.store(true, Ordering::SeqCst);
        Ok(MovingOut {
            c: c.clone(),
            froze,
        })
    }

    /// The dump failed or was called off: the container runs on, with
    /// whatever the dump left undone (stopped tasks, the network lock)
    /// undone.
    fn called_off(&self) {
        self.c.moving_out.store(false, Ordering::SeqCst);
        if self.froze {
            self.c.thaw_after_failed_checkpoint();
        }
    }
}

/// The runs each task of the dump left to the page server, by pid.
fn served(images: &Path) -> Result<HashMap<u32, TaskMemory>> {
    let mut out = HashMap::new();
    let entries = std::fs::read_dir(images)
        .map_err(|e| Error::io(format!("read {}", images.display()), e))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mm-")?.strip_suffix(".img")?.parse().ok())
        else {
            continue;
        };
        let m = served_memory(images, pid).map_err(|e| Error::Other(e.to_string()))?;
        out.insert(pid, m);
    }
    Ok(out)
}

/// Serves one post-copy transfer, then ends or calls off the dump.
struct Relay {
    moving: MovingOut,
    listener: TcpListener,
    criu: Option<PageClient<TcpStream>>,
    key: Vec<u8>,
    session: SessionId,
    memory: HashMap<u32, TaskMemory>,
    dump: Receiver<DumpResult>,
    idle: Duration,
    archive: Report,
    progress: Option<PathBuf>,
    _staging: Staging,
}

/// How a transfer went.
struct Moved {
    peer: SocketAddr,
    bytes: u64,
    elapsed: Duration,
    requests: u64,
    /// Spent waiting for CRIU's page server, and sending to the peer.
    in_criu: Duration,
    sending: Duration,
}

impl Relay {
    fn run(mut self) {
        let id = self.moving.c.id.clone();
        let started = Instant::now();
        let served = self.serve();
        if let Some(dir) = &self.progress {
            let end = PostCopyEnd {
                moved: served.is_ok(),
                bytes: served.as_ref().map_or(0, |m| m.bytes),
                seconds: started.elapsed().as_secs_f64(),
                why: served.as_ref().err().cloned(),
            };
            if let Err(e) = end.write(dir) {
                // The waiting CLI then says the shim went away.
                log::warn!("post-copy: cannot tell the waiting CLI how it ended: {e}");
            }
        }
        match served {
            Ok(m) => {
                log::info!(
                    "post-copy of {id}: {} MiB served to {} in {:?} ({:.0} MiB/s, {} requests, \
                     {:?} of it in CRIU's page server, {:?} sending); the dump ended and the \
                     source exited",
                    m.bytes >> 20,
                    m.peer,
                    m.elapsed,
                    m.bytes as f64 / (1 << 20) as f64 / m.elapsed.as_secs_f64().max(1e-3),
                    m.requests,
                    m.in_criu,
                    m.sending
                );
                match self.dump.recv_timeout(Duration::from_secs(60)) {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => log::warn!("post-copy of {id}: runc after the dump: {e}"),
                    Err(_) => log::warn!("post-copy of {id}: runc did not return"),
                }
            }
            Err(why) => {
                log::error!(
                    "post-copy of {id} called off: {why}; the source resumes (CRIU thaws it)"
                );
                self.criu = None;
                wait_for_dump(&self.moving.c, &self.dump);
                self.moving.called_off();
            }
        }
        // Without its source the archive can never be restored again.
        migrate::unpublish(&self.archive);
    }

    fn serve(&mut self) -> std::result::Result<Moved, String> {
        let (mut stream, peer) = self.accept()?;
        let started = Instant::now();
        let total: u64 = self.memory.values().map(TaskMemory::bytes).sum();
        let (mut bytes, mut logged, mut shown) = (0u64, Instant::now(), Instant::now());
        let (mut requests, mut in_criu, mut sending) = (0u64, Duration::ZERO, Duration::ZERO);
        let mut buf = vec![0u8; MAX_PAGES as usize * PAGE_SIZE];
        loop {
            let request = stream.next_request().map_err(|e| match e {
                page_stream::StreamError::Io(io) if is_timeout(&io) => format!(
                    "the restoring node {peer} was silent for {:?} ({})",
                    self.idle,
                    env::POST_COPY_IDLE_SECS
                ),
                e => format!("the restoring node {peer}: {e}"),
            })?;
            match request {
                Some(Request::Get { pid, vaddr, pages }) => {
                    let len = pages as usize * PAGE_SIZE;
                    let asked = Instant::now();
                    let n = match self.forward(pid, vaddr, &mut buf[..len]) {
                        Ok(n) => n,
                        Err(why) => {
                            let _ = stream.answer(&Answer::Refused(why.clone()));
                            return Err(why);
                        }
                    };
                    let got = Instant::now();
                    in_criu += got - asked;
                    stream
                        .answer(&Answer::Pages {
                            vaddr,
                            bytes: &buf[..n],
                        })
                        .map_err(|e| format!("send pages to {peer}: {e}"))?;
                    sending += got.elapsed();
                    requests += 1;
                    bytes += n as u64;
                    if let (Some(dir), true) = (&self.progress, shown.elapsed() >= SHOW_EVERY) {
                        shown = Instant::now();
                        let progress = ProgressReport {
                            phase: "post-copy".into(),
                            done_bytes: bytes,
                            total_bytes: Some(total),
                        };
                        // The CLI shows what it last read; a missed update is harmless.
                        let _ = progress.write(dir);
                    }
                    if logged.elapsed() >= PROGRESS_EVERY {
                        logged = Instant::now();
                        log::info!(
                            "post-copy of {}: {} of {} MiB served to {peer} ({:.0} MiB/s), \
                             {} MiB left",
                            self.moving.c.id,
                            bytes >> 20,
                            total >> 20,
                            bytes as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64(),
                            total.saturating_sub(bytes) >> 20
                        );
                    }
                }
                Some(Request::Done) => {
                    let criu = self.criu.take().ok_or("the dump has ended already")?;
                    if let Err(e) = criu.finish() {
                        let why = format!("CRIU could not end the dump: {e}");
                        let _ = stream.answer(&Answer::Refused(why.clone()));
                        return Err(why);
                    }
                    // The source is gone from here on: whatever happens to
                    // this answer, the restored copy is the one.
                    if let Err(e) = stream.answer(&Answer::Finished) {
                        log::warn!("post-copy: tell {peer} the dump ended: {e}");
                    }
                    return Ok(Moved {
                        peer,
                        bytes,
                        elapsed: started.elapsed(),
                        requests,
                        in_criu,
                        sending,
                    });
                }
                None => {
                    return Err(format!(
                        "the restoring node {peer} closed the connection before every page \
                         had moved"
                    ))
                }
            }
        }
    }

    /// Waits (at most the idle timeout) for a connection that proves it
    /// holds the key; others are logged and dropped.
    fn accept(&mut self) -> std::result::Result<(Stream, SocketAddr), String> {
        let deadline = Instant::now() + self.idle;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| format!("relay socket: {e}"))?;
        loop {
            if let Ok(result) = self.dump.try_recv() {
                return Err(format!(
                    "the dump ended before a restoring node connected: {:?}",
                    result.err()
                ));
            }
            match self.listener.accept() {
                Ok((tcp, peer)) => match self.authenticate(tcp) {
                    Ok(s) => {
                        log::info!("post-copy of {}: {peer} connected", self.moving.c.id);
                        return Ok((s, peer));
                    }
                    Err(e) => log::warn!(
                        "post-copy of {}: refused a connection from {peer}: {e}",
                        self.moving.c.id
                    ),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "no restoring node connected within {:?} ({})",
                            self.idle,
                            env::POST_COPY_IDLE_SECS
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
    }

    fn authenticate(&self, tcp: TcpStream) -> std::result::Result<Stream, String> {
        tcp.set_nonblocking(false)
            .and_then(|()| tcp.set_nodelay(true))
            .and_then(|()| tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT)))
            .and_then(|()| tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
            .map_err(|e| e.to_string())?;
        let s = page_stream::accept(tcp, &self.key, &self.session).map_err(|e| e.to_string())?;
        s.get_ref()
            .set_read_timeout(Some(self.idle))
            .and_then(|()| s.get_ref().set_write_timeout(Some(self.idle)))
            .map_err(|e| e.to_string())?;
        Ok(s)
    }

    /// One request to CRIU, if it lies inside a run the dump left to the
    /// page server (CRIU crashes on anything else); returns the bytes.
    fn forward(
        &mut self,
        pid: u32,
        vaddr: u64,
        buf: &mut [u8],
    ) -> std::result::Result<usize, String> {
        if !serves(&self.memory, pid, vaddr, buf.len() as u64) {
            return Err(format!(
                "a request for {} bytes at {vaddr:#x} of task {pid}, outside the memory the \
                 dump serves",
                buf.len()
            ));
        }
        let criu = self.criu.as_mut().ok_or("the dump has ended")?;
        let mut at = 0;
        while at < buf.len() {
            at += criu
                .get(pid, vaddr + at as u64, &mut buf[at..])
                .map_err(|e| format!("CRIU's page server: {e}"))?;
        }
        Ok(at)
    }
}

type Stream = page_stream::Stream<TcpStream>;

/// Whether `len` bytes at `vaddr` of task `pid` lie inside one run the
/// dump left to its page server: the only requests CRIU survives.
fn serves(memory: &HashMap<u32, TaskMemory>, pid: u32, vaddr: u64, len: u64) -> bool {
    let Some(end) = vaddr.checked_add(len) else {
        return false;
    };
    memory
        .get(&pid)
        .is_some_and(|m| m.ranges.iter().any(|r| r.start <= vaddr && end <= r.end))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use criu_sys::memory::LazyRange;

    #[test]
    fn only_requests_inside_one_served_run_reach_criu() {
        let run = |start: u64, end: u64| LazyRange {
            start,
            end,
            offset: 0,
        };
        let memory = HashMap::from([(
            7,
            TaskMemory {
                pages_id: 1,
                ranges: vec![run(0x1000, 0x5000), run(0x5000, 0x9000)],
            },
        )]);
        assert!(serves(&memory, 7, 0x1000, 0x4000));
        assert!(serves(&memory, 7, 0x6000, 0x1000));
        // Another task (CRIU would crash), across two runs, past the end,
        // before the start, wrapping around.
        assert!(!serves(&memory, 8, 0x1000, 0x1000));
        assert!(!serves(&memory, 7, 0x4000, 0x2000));
        assert!(!serves(&memory, 7, 0x8000, 0x2000));
        assert!(!serves(&memory, 7, 0, 0x1000));
        assert!(!serves(&memory, 7, u64::MAX - 0xfff, 0x2000));
    }
}
