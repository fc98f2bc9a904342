//! Restoring memory through userfaultfd, without a staging copy.
//!
//! runc restores with `--lazy-pages`: CRIU rebuilds the process tree
//! without the private anonymous pages and registers those mappings with
//! userfaultfd, handing each task's uffd to this daemon over
//! `lazy-pages.socket` (criu-sys [`criu_sys::lazy`]). The pages come
//! straight from the archive on the share ([`super::pages`]), so no copy of
//! the memory is staged on the node. Two uses:
//! - a cold restore (the default): the tasks stay stopped until every page
//!   is in place and verified, and Create fails (the tasks killed) if one
//!   cannot be had;
//! - a lazy restore (`criu-shim.io/migration: lazy`): the tasks run at
//!   once, before their memory is back.
//!
//! From the moment CRIU hands a task over:
//! - a thread touching a missing page waits until we copy it in
//!   (UFFDIO_COPY); we copy a run around it, read from a [`PageSource`];
//! - once CRIU says the restore is finished, the rest moves in the
//!   background, mapping by mapping, until every page is in place, and
//!   the uffds are closed;
//! - pages the images never held are the zero page;
//! - fork, mremap, madvise(DONTNEED) and munmap are followed, so a task that
//!   changes its memory while pages move gets what it would have had.
//!
//! A page the source cannot give (a digest that does not match, a read
//! error) means the task's memory can never be whole: the container is
//! killed *before* the uffds are closed (closing them would let the tasks
//! run on with zero pages where their data was), and the failure is
//! logged with its reason.
//!
//! The daemon is one thread in the shim; it owns the page source (and the
//! staging the source reads from) until every page has moved.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criu_sys::lazy::{LazyConnection, LazyListener, LazyMessage};
use criu_sys::memory::{task_memory, LazyRange, TaskMemory, PAGE_SIZE};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::uffd::{self, Event, Filled};
use crate::error::{Error, Result};

/// How much a source is asked for at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    /// Bytes copied around a faulting page: enough to make a sequential
    /// scan cheap, small enough that one fault does not wait long.
    pub fault: u64,
    /// Bytes copied per background step (between two looks at the uffds).
    pub background: u64,
}

/// For sources read locally (the share): a fault costs a read, not a
/// round trip, and large background steps keep the disk streaming.
pub const LOCAL_RUNS: Runs = Runs {
    fault: 128 << 10,
    background: 1 << 20,
};
/// How often a waiting daemon looks at its stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Where the bytes of the images' pages come from.
pub trait PageSource: Send {
    /// Task `pid`'s memory to serve, as the images in `images` describe
    /// it: by default the lazy runs whose bytes are in its pages image
    /// (offsets into it).
    fn memory(&self, images: &Path, pid: u32) -> std::result::Result<TaskMemory, String> {
        task_memory(images, pid).map_err(|e| e.to_string())
    }

    /// Fills `buf` with task `pid`'s bytes at `offset` (of
    /// `pages-<pages_id>.img`, or whatever [`PageSource::memory`] made
    /// offsets mean), verified; an error names what went wrong.
    fn read(
        &mut self,
        pid: u32,
        pages_id: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), String>;

    /// The daemon's next background read will likely be `len` bytes at
    /// `offset` of task `pid`: a source with a round trip per read (the
    /// source node) asks for them while the current read is answered.
    fn hint_next(&mut self, _pid: u32, _pages_id: u32, _offset: u64, _len: u64) {}

    /// How much to ask for per fault and per background step.
    fn runs(&self) -> Runs {
        LOCAL_RUNS
    }

    /// Every page is in place. A source that must be told (the source
    /// node, which then ends its dump) is told here; an error means the
    /// restored copy must not run on.
    fn finished(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Where a lazy restore stands.
#[derive(Debug, Clone)]
pub enum State {
    /// CRIU has not handed over every task yet.
    Restoring,
    /// Tasks may run; pages are moving.
    Moving { moved: u64, total: u64 },
    /// Every page is in place.
    Done(Summary),
    /// A page could not be had; the container was killed.
    Failed(String),
    /// Stopped before the end (the container went away).
    Stopped,
}

/// What a finished lazy restore measured.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub bytes: u64,
    pub faults: u64,
    /// From the first task handed over to the last page in place.
    pub elapsed: Duration,
    /// Time to serve a fault: mean and worst.
    pub mean_fault: Duration,
    pub worst_fault: Duration,
}

struct Shared {
    stop: AtomicBool,
    /// runc's restore has returned (set and read under `state`'s lock): a
    /// failure from then on must kill the tasks, which may run; before,
    /// it must not (they are inside CRIU's restore).
    released: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn new(released: bool) -> Arc<Shared> {
        Arc::new(Shared {
            stop: AtomicBool::new(false),
            released: AtomicBool::new(released),
            state: Mutex::new(State::Restoring),
            changed: Condvar::new(),
        })
    }

    fn set(&self, s: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        self.changed.notify_all();
    }
}

/// Called once if a page cannot be had: must kill the container.
pub type OnFailure = Box<dyn FnOnce(&str) + Send>;

/// A lazy restore's daemon thread.
pub struct LazyRestore {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LazyRestore {
    /// Listens in CRIU's `work_dir` and serves pages of the tasks in
    /// `images` from `source`. Start it before the restore, on a node
    /// whose userfaultfd the caller has checked (`uffd::available`).
    pub fn start(
        id: &str,
        work_dir: &Path,
        images: &Path,
        source: Box<dyn PageSource>,
        on_failure: OnFailure,
    ) -> Result<LazyRestore> {
        // runc makes CRIU's work directory when it restores; we listen first.
        let listener = std::os::unix::fs::DirBuilderExt::mode(
            std::fs::DirBuilder::new().recursive(true),
            0o700,
        )
        .create(work_dir)
        .and_then(|()| LazyListener::bind(work_dir))
        .map_err(|e| {
            Error::Other(format!(
                "restore of {id}: cannot listen for CRIU in {}: {e}",
                work_dir.display()
            ))
        })?;
        let shared = Shared::new(false);
        let daemon = Daemon::new(id, images, source, Some(listener), shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("lazy-{id}"))
            .spawn(move || daemon.run(on_failure))
            .map_err(|e| {
                Error::Other(format!(
                    "restore of {id}: no thread to serve its memory: {e}"
                ))
            })?;
        Ok(LazyRestore {
            shared,
            thread: Some(thread),
        })
    }

    /// runc's restore has returned: from now on a failure kills the
    /// container. Fails if restoring the memory has failed already.
    pub fn release(&self) -> Result<()> {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.released.store(true, Ordering::SeqCst);
        match &*state {
            State::Failed(why) => Err(Error::FailedPrecondition(format!(
                "restoring its memory failed: {why}"
            ))),
            _ => Ok(()),
        }
    }

    /// Why the restore failed, if it did.
    pub fn failure(&self) -> Option<String> {
        match &*self.shared.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Failed(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// Waits until every page has moved (a checkpoint needs the whole
    /// memory), at most `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<Summary> {
        let end = Instant::now() + timeout;
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*state {
                State::Done(s) => return Ok(s.clone()),
                State::Failed(why) => {
                    return Err(Error::FailedPrecondition(format!(
                        "restoring its memory failed, its tasks were killed: {why}"
                    )))
                }
                State::Stopped => {
                    return Err(Error::FailedPrecondition(
                        "restoring its memory was stopped".into(),
                    ))
                }
                State::Restoring | State::Moving { .. } => {}
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let how_far = match &*state {
                    State::Moving { moved, total } => {
                        format!("{} of {} MiB moved", moved >> 20, total >> 20)
                    }
                    _ => "the restore has not finished".into(),
                };
                return Err(Error::DeadlineExceeded(format!(
                    "its memory is still being restored ({how_far}); try again \
                     once it is in place"
                )));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pages of one task still to move: start -> (end, offset in its pages image).
#[derive(Debug, Clone, Default, PartialEq)]
struct Ranges(BTreeMap<u64, Piece>);

#[derive(Debug, Clone, Copy, PartialEq)]
struct Piece {
    end: u64,
    offset: u64,
}

impl Ranges {
    fn of(ranges: &[LazyRange]) -> Ranges {
        Ranges(
            ranges
                .iter()
                .map(|r| {
                    (
                        r.start,
                        Piece {
                            end: r.end,
                            offset: r.offset,
                        },
                    )
                })
                .collect(),
        )
    }

    fn find(&self, addr: u64) -> Option<(u64, Piece)> {
        let (&s, &p) = self.0.range(..=addr).next_back()?;
        (addr < p.end).then_some((s, p))
    }

    fn first(&self) -> Option<(u64, Piece)> {
        self.0.iter().next().map(|(&s, &p)| (s, p))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, p)| p.end - s).sum()
    }

    /// Removes [start, end) and returns what of it was there.
    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, Piece)> {
        let hit: Vec<(u64, Piece)> = self
            .0
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > start)
            .map(|(&s, &p)| (s, p))
            .collect();
        let mut out = Vec::new();
        for (s, p) in hit.into_iter().rev() {
            self.0.remove(&s);
            if s < start {
                self.0.insert(
                    s,
                    Piece {
                        end: start,
                        offset: p.offset,
                    },
                );
            }
            if p.end > end {
                self.0.insert(
                    end,
                    Piece {
                        end: p.end,
                        offset: p.offset + (end - s),
                    },
                );
            }
            let from = s.max(start);
            out.push((
                from,
                Piece {
                    end: p.end.min(end),
                    offset: p.offset + (from - s),
                },
            ));
        }
        out
    }

    fn put(&mut self, start: u64, p: Piece) {
        if start < p.end {
            self.0.insert(start, p);
        }
    }

    /// `mremap` moved [from, from + len) to `to`.
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        for (s, p) in self.take(from, from.saturating_add(len)) {
            let moved = s - from + to;
            self.put(
                moved,
                Piece {
                    end: moved + (p.end - s),
                    offset: p.offset,
                },
            );
        }
    }
}

struct Task {
    pid: u32,
    uffd: OwnedFd,
    pages_id: u32,
    ranges: Ranges,
    /// A forked child shares its parent's images: its copies do not count
    /// towards the progress of the restore.
    counts: bool,
    gone: bool,
}

enum Exit {
    Done,
    Stopped,
}

struct Daemon {
    id: String,
    images: PathBuf,
    source: Box<dyn PageSource>,
    /// The source's run sizes, asked once.
    runs: Runs,
    listener: Option<LazyListener>,
    conn: Option<LazyConnection>,
    tasks: Vec<Task>,
    /// CRIU said every task is restored: background copying may start.
    finished: bool,
    /// Faults to serve again once the task's mappings settle.
    pending: Vec<(usize, u64, Instant)>,
    buf: Vec<u8>,
    shared: Arc<Shared>,
    total: u64,
    moved: u64,
    faults: u64,
    fault_time: Duration,
    worst_fault: Duration,
    started: Option<Instant>,
    logged: Instant,
}

impl Daemon {
    fn new(
        id: &str,
        images: &Path,
        source: Box<dyn PageSource>,
        listener: Option<LazyListener>,
        shared: Arc<Shared>,
    ) -> Daemon {
        Daemon {
            id: id.to_string(),
            images: images.to_path_buf(),
            runs: source.runs(),
            source,
            listener,
            conn: None,
            tasks: Vec::new(),
            finished: false,
            pending: Vec::new(),
            buf: Vec::new(),
            shared,
            total: 0,
            moved: 0,
            faults: 0,
            fault_time: Duration::ZERO,
            worst_fault: Duration::ZERO,
            started: None,
            logged: Instant::now(),
        }
    }

    fn run(mut self, on_failure: OnFailure) {
        match self.serve() {
            Ok(Exit::Done) => {
                let s = self.summary();
                log::info!(
                    "{}: all {} MiB of memory in place {:?} after the restore began \
                     ({:.0} MiB/s); {} faults served, mean {:?}, worst {:?}",
                    self.id,
                    s.bytes >> 20,
                    s.elapsed,
                    mib_per_s(s.bytes, s.elapsed),
                    s.faults,
                    s.mean_fault,
                    s.worst_fault
                );
                self.shared.set(State::Done(s));
            }
            Ok(Exit::Stopped) => self.shared.set(State::Stopped),
            Err(why) => {
                // Decided under the state's lock, which release() takes too:
                // tasks that may have run (runc's restore has returned) are
                // killed before the uffds close (after, they would run on
                // with zero pages where their data was); tasks still inside
                // the restore are left to it, which then fails.
                let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
                let released = self.shared.released.load(Ordering::SeqCst);
                log::error!(
                    "{}: restoring its memory failed: {why}{}",
                    self.id,
                    if released {
                        "; killing the container, whose memory cannot be made whole"
                    } else {
                        ""
                    }
                );
                if released {
                    on_failure(&why);
                }
                *state = State::Failed(why);
                self.shared.changed.notify_all();
            }
        }
        // The uffds close here, with the tasks.
    }

    fn summary(&self) -> Summary {
        Summary {
            bytes: self.moved,
            faults: self.faults,
            elapsed: self.started.map(|t| t.elapsed()).unwrap_or_default(),
            mean_fault: self
                .fault_time
                .checked_div(self.faults.max(1) as u32)
                .unwrap_or_default(),
            worst_fault: self.worst_fault,
        }
    }

    fn serve(&mut self) -> std::result::Result<Exit, String> {
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Ok(Exit::Stopped);
            }
            let background = self.finished && self.tasks.iter().any(|t| !t.ranges.is_empty());
            let ready = self.wait_for_input(if background {
                Duration::ZERO
            } else {
                IDLE_POLL
            })?;
            if ready.listener {
                self.accept()?;
            }
            if ready.conn {
                self.read_restore()?;
            }
            for i in ready.tasks {
                self.drain(i)?;
            }
            self.retry_pending()?;
            if self.finished {
                self.background_step()?;
            }
            self.drop_finished_tasks();
            self.report();
            if self.finished && self.tasks.is_empty() {
                self.source.finished()?;
                return Ok(Exit::Done);
            }
        }
    }

    fn wait_for_input(&self, timeout: Duration) -> std::result::Result<Ready, String> {
        let mut fds: Vec<PollFd> = Vec::new();
        let listener = self.conn.is_none() && self.listener.is_some();
        if let (true, Some(l)) = (listener, &self.listener) {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        if let Some(c) = &self.conn {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
        }
        let first_task = fds.len();
        for t in &self.tasks {
            fds.push(PollFd::new(t.uffd.as_fd(), PollFlags::POLLIN));
        }
        let ms = PollTimeout::from(timeout.as_millis().min(1000) as u16);
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let hit = |f: &PollFd| {
            f.revents().is_some_and(|r| {
                r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
            })
        };
        let mut at = 0;
        let mut ready = Ready::default();
        if listener {
            ready.listener = hit(&fds[at]);
            at += 1;
        }
        if self.conn.is_some() {
            ready.conn = hit(&fds[at]);
        }
        ready.tasks = fds[first_task..]
            .iter()
            .enumerate()
            .filter(|(_, f)| hit(f))
            .map(|(i, _)| i)
            .collect();
        Ok(ready)
    }

    fn accept(&mut self) -> std::result::Result<(), String> {
        if let Some(l) = &self.listener {
            if let Some(c) = l
                .accept()
                .map_err(|e| format!("accept CRIU's connection: {e}"))?
            {
                self.conn = Some(c);
                // One restore, one connection.
                self.listener = None;
            }
        }
        Ok(())
    }

    fn read_restore(&mut self) -> std::result::Result<(), String> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        match conn.recv() {
            Ok(Some(LazyMessage::Task { pid, uffd })) => {
                let mem = self.source.memory(&self.images, pid)?;
                self.started.get_or_insert_with(Instant::now);
                self.total += mem.bytes();
                log::debug!(
                    "{}: task {pid}: {} MiB of memory to serve, in {} runs",
                    self.id,
                    mem.bytes() >> 20,
                    mem.ranges.len()
                );
                self.tasks.push(Task {
                    pid,
                    uffd,
                    pages_id: mem.pages_id,
                    ranges: Ranges::of(&mem.ranges),
                    counts: true,
                    gone: false,
                });
            }
            Ok(Some(LazyMessage::Zombie { .. })) => {}
            Ok(Some(LazyMessage::RestoreFinished)) => {
                self.finished = true;
                self.shared.set(State::Moving {
                    moved: self.moved,
                    total: self.total,
                });
            }
            Ok(None) => {
                self.conn = None;
                if !self.finished {
                    // CRIU failed (runc reports why); its tasks are gone.
                    return Err(
                        "CRIU closed the lazy-pages socket before the restore finished".into(),
                    );
                }
            }
            Err(e) => return Err(format!("read from CRIU's lazy-pages socket: {e}")),
        }
        Ok(())
    }

    /// Every message waiting on task `i`'s uffd.
    fn drain(&mut self, i: usize) -> std::result::Result<(), String> {
        loop {
            if self.tasks[i].gone {
                return Ok(());
            }
            let event = match uffd::read_event(&self.tasks[i].uffd) {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(()),
                Err(nix::errno::Errno::ESRCH) => {
                    self.tasks[i].gone = true;
                    return Ok(());
                }
                Err(e) => {
                    return Err(format!(
                        "task {}: read its userfaultfd: {e}",
                        self.tasks[i].pid
                    ))
                }
            };
            match event {
                Event::PageFault { address } => self.fault(i, address, Instant::now())?,
                Event::Fork { child } => {
                    let parent = &self.tasks[i];
                    let t = Task {
                        pid: parent.pid,
                        uffd: child,
                        pages_id: parent.pages_id,
                        ranges: parent.ranges.clone(),
                        counts: false,
                        gone: false,
                    };
                    self.tasks.push(t);
                }
                Event::Remap { from, to, len } => self.tasks[i].ranges.remap(from, to, len),
                Event::Remove { start, end } => {
                    let dropped = self.tasks[i].ranges.take(start, end);
                    if self.tasks[i].counts {
                        // Pages the task threw away count as moved.
                        self.moved += dropped.iter().map(|(s, p)| p.end - s).sum::<u64>();
                    }
                }
            }
        }
    }

    fn fault(&mut self, i: usize, address: u64, since: Instant) -> std::result::Result<(), String> {
        let page = address & !(PAGE_SIZE - 1);
        let filled = match self.tasks[i].ranges.find(page) {
            None => uffd::zero(&self.tasks[i].uffd, page)
                .map_err(|e| format!("task {}: zero page at {page:#x}: {e}", self.tasks[i].pid))?,
            Some((_, p)) => {
                let end = p.end.min(page + self.runs.fault);
                let mut last = Filled::Done;
                for (s, piece) in self.tasks[i].ranges.take(page, end) {
                    last = self.fill(i, s, piece)?;
                    if last != Filled::Done {
                        break;
                    }
                }
                last
            }
        };
        match filled {
            Filled::Retry { .. } => self.pending.push((i, page, since)),
            Filled::Gone => self.tasks[i].gone = true,
            Filled::Done => {
                let took = since.elapsed();
                self.faults += 1;
                self.fault_time += took;
                self.worst_fault = self.worst_fault.max(took);
            }
        }
        Ok(())
    }

    /// Copies one piece in; what is not copied goes back to the ranges.
    fn fill(&mut self, i: usize, start: u64, p: Piece) -> std::result::Result<Filled, String> {
        let len = (p.end - start) as usize;
        self.buf.resize(len, 0);
        let task = &mut self.tasks[i];
        self.source
            .read(task.pid, task.pages_id, p.offset, &mut self.buf[..len])
            .map_err(|why| format!("task {}: memory at {start:#x}: {why}", task.pid))?;
        let filled = uffd::copy(&task.uffd, start, &self.buf[..len])
            .map_err(|e| format!("task {}: copy {len} bytes to {start:#x}: {e}", task.pid))?;
        let done = match filled {
            Filled::Done => len as u64,
            Filled::Retry { done } => {
                task.ranges.put(
                    start + done,
                    Piece {
                        end: p.end,
                        offset: p.offset + done,
                    },
                );
                done
            }
            Filled::Gone => {
                task.gone = true;
                0
            }
        };
        if task.counts {
            self.moved += done;
        }
        Ok(filled)
    }

    fn retry_pending(&mut self) -> std::result::Result<(), String> {
        for (i, page, since) in std::mem::take(&mut self.pending) {
            if !self.tasks[i].gone {
                self.fault(i, page, since)?;
            }
        }
        Ok(())
    }

    fn background_step(&mut self) -> std::result::Result<(), String> {
        let Some(i) = self
            .tasks
            .iter()
            .position(|t| !t.gone && !t.ranges.is_empty())
        else {
            return Ok(());
        };
        let Some((s, p)) = self.tasks[i].ranges.first() else {
            return Ok(());
        };
        let end = p.end.min(s + self.runs.background);
        let pieces = self.tasks[i].ranges.take(s, end);
        let task = &self.tasks[i];
        if let Some((next, piece)) = task.ranges.first() {
            let len = piece.end.min(next + self.runs.background) - next;
            self.source
                .hint_next(task.pid, task.pages_id, piece.offset, len);
        }
        for (start, piece) in pieces {
            if self.fill(i, start, piece)? != Filled::Done {
                break;
            }
        }
        Ok(())
    }

    /// Tasks that exited, and (once the restore is finished) tasks with
    /// nothing left to move: their uffds close, and their mappings behave
    /// as any other memory from then on.
    fn drop_finished_tasks(&mut self) {
        if !self.pending.is_empty() {
            return; // indices in `pending` must stay valid
        }
        let finished = self.finished;
        let mut moved_away = 0;
        self.tasks.retain(|t| {
            let done = finished && t.ranges.is_empty();
            let keep = !t.gone && !done;
            if !keep && t.gone && t.counts {
                moved_away += t.ranges.bytes();
            }
            keep
        });
        // A task that exits leaves nothing to move.
        self.moved += moved_away;
    }

    fn report(&mut self) {
        if self.logged.elapsed() < PROGRESS_EVERY || !self.finished {
            return;
        }
        self.logged = Instant::now();
        let elapsed = self.started.map(|t| t.elapsed()).unwrap_or_default();
        log::info!(
            "{}: {} of {} MiB of memory in place ({:.0} MiB/s), {} faults served",
            self.id,
            self.moved >> 20,
            self.total >> 20,
            mib_per_s(self.moved, elapsed),
            self.faults
        );
        self.shared.set(State::Moving {
            moved: self.moved,
            total: self.total,
        });
    }
}

#[derive(Default)]
struct Ready {
    listener: bool,
    conn: bool,
    tasks: Vec<usize>,
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-3)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn ranges(v: &[(u64, u64, u64)]) -> Ranges {
        Ranges::of(
            &v.iter()
                .map(|&(start, end, offset)| LazyRange { start, end, offset })
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn taking_splits_pieces_and_keeps_offsets() {
        let mut r = ranges(&[(0, 4 * P, 100 * P), (8 * P, 12 * P, 200 * P)]);
        let got = r.take(P, 10 * P);
        assert_eq!(
            got,
            vec![
                (
                    P,
                    Piece {
                        end: 4 * P,
                        offset: 101 * P
                    }
                ),
                (
                    8 * P,
                    Piece {
                        end: 10 * P,
                        offset: 200 * P
                    }
                ),
            ]
        );
        assert_eq!(r, ranges(&[(0, P, 100 * P), (10 * P, 12 * P, 202 * P)]));
        assert_eq!(r.find(P), None, "taken pages are no longer found");
        assert_eq!(r.find(11 * P).map(|(s, _)| s), Some(10 * P));
        assert_eq!(r.bytes(), 3 * P);
    }

    /// A region of this process registered with a userfaultfd, as CRIU's
    /// restorer registers a restored task's lazy mappings.
    struct Region {
        addr: u64,
        len: u64,
    }

    impl Region {
        fn new(pages: u64) -> (Region, OwnedFd) {
            Region::with_features(pages, 0)
        }

        /// With userfaultfd `features` (CRIU asks for the fork, remap,
        /// remove and unmap events).
        fn with_features(pages: u64, features: u64) -> (Region, OwnedFd) {
            let len = pages * P;
            // SAFETY: a fresh anonymous private mapping, unmapped in Drop.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            let uffd = uffd::open(features).unwrap();
            uffd::register(&uffd, addr as u64, len).unwrap();
            (
                Region {
                    addr: addr as u64,
                    len,
                },
                uffd,
            )
        }

        /// What a task reads at page `n` (faulting it in).
        fn byte(&self, n: u64) -> u8 {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::read_volatile((self.addr + n * P + 7) as *const u8) }
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: the mapping made in new().
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
        }
    }

    /// Every byte of page `n` of the images.
    fn pattern(n: u64) -> u8 {
        (n as u8).wrapping_add(1)
    }

    /// Pages holding [`pattern`]; reads past `fail_from` fail.
    struct Pattern {
        fail_from: u64,
    }

    impl PageSource for Pattern {
        fn read(
            &mut self,
            _: u32,
            _: u32,
            offset: u64,
            buf: &mut [u8],
        ) -> std::result::Result<(), String> {
            if offset.saturating_add(buf.len() as u64) > self.fail_from {
                return Err("frame 3 does not match its digest".into());
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = pattern((offset + i as u64) / P);
            }
            Ok(())
        }
    }

    /// A restored task whose lazy memory is `region`'s first `pages`
    /// pages, at the images' offset 0.
    fn task(region: &Region, uffd: OwnedFd, pages: u64) -> Task {
        Task {
            pid: 1,
            uffd,
            pages_id: 1,
            ranges: ranges(&[(region.addr, region.addr + pages * P, 0)]),
            counts: true,
            gone: false,
        }
    }

    fn daemon(source: Pattern) -> (Daemon, Arc<Shared>) {
        // As after runc's restore has returned.
        let shared = Shared::new(true);
        let d = Daemon::new(
            "t",
            Path::new("/nonexistent"),
            Box::new(source),
            None,
            shared.clone(),
        );
        (d, shared)
    }

    #[test]
    fn faults_are_served_and_the_rest_moves_in_the_background() {
        let pages = 600u64;
        let (region, uffd) = Region::new(pages);
        let (mut d, shared) = daemon(Pattern {
            fail_from: u64::MAX,
        });
        // The images hold pages 0..500 (page k at offset k pages); 500..600
        // were never touched before the dump: zero pages.
        d.tasks.push(task(&region, uffd, 500));
        d.total = 500 * P;
        let faults = std::thread::scope(|s| {
            let daemon = s.spawn(move || {
                // Serve faults only, then (as if CRIU said so) everything.
                let until = Instant::now() + Duration::from_millis(300);
                while Instant::now() < until {
                    let ready = d.wait_for_input(Duration::from_millis(10)).unwrap();
                    for i in ready.tasks {
                        d.drain(i).unwrap();
                    }
                }
                let faults = d.faults;
                d.finished = true;
                d.run(Box::new(|why| panic!("failed: {why}")));
                faults
            });
            // A task touching pages here and there while nothing moves in
            // the background: each one is served on its fault.
            for n in [3u64, 450, 0, 599, 200] {
                let want = if n < 500 { pattern(n) } else { 0 };
                assert_eq!(region.byte(n), want, "page {n}");
            }
            daemon.join().unwrap()
        });
        assert_eq!(faults, 5, "one fault per page touched");
        let state = shared.state.lock().unwrap().clone();
        let State::Done(summary) = state else {
            panic!("{state:?}")
        };
        assert_eq!(summary.bytes, 500 * P, "every page moved");
        // All in place: reading now faults no more (the uffd is closed, so
        // a missing page would read as zero, not as its pattern).
        for n in 0..500 {
            assert_eq!(region.byte(n), pattern(n), "page {n}");
        }
    }

    /// The task changes its memory while pages move (madvise DONTNEED,
    /// mremap): what it reads is what it would have read had every page
    /// been there at once.
    #[test]
    fn the_task_s_own_changes_to_its_memory_are_followed() {
        const REMAP: u64 = 1 << 2;
        const REMOVE: u64 = 1 << 3;
        let (region, uffd) = Region::with_features(64, REMAP | REMOVE);
        let (mut d, _shared) = daemon(Pattern {
            fail_from: u64::MAX,
        });
        d.tasks.push(task(&region, uffd, 64));
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let serving = s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let ready = d.wait_for_input(Duration::from_millis(10)).unwrap();
                    for i in ready.tasks {
                        d.drain(i).unwrap();
                    }
                }
            });
            // SAFETY: calls on the test's own mapping, and a reserved
            // mapping to move part of it to.
            unsafe {
                let dontneed = (region.addr + 10 * P) as *mut libc::c_void;
                assert_eq!(
                    libc::madvise(dontneed, (4 * P) as usize, libc::MADV_DONTNEED),
                    0
                );
                let to = libc::mmap(
                    std::ptr::null_mut(),
                    (10 * P) as usize,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(to, libc::MAP_FAILED);
                let moved = libc::mremap(
                    (region.addr + 20 * P) as *mut libc::c_void,
                    (10 * P) as usize,
                    (10 * P) as usize,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    to,
                );
                assert_eq!(moved, to, "{}", std::io::Error::last_os_error());
                let at_new = std::ptr::read_volatile((to as u64 + 2 * P + 7) as *const u8);
                assert_eq!(at_new, pattern(22), "a moved page keeps its content");
                libc::munmap(to, (10 * P) as usize);
            }
            assert_eq!(region.byte(11), 0, "a page thrown away reads as zero");
            assert_eq!(region.byte(5), pattern(5));
            stop.store(true, Ordering::SeqCst);
            serving.join().unwrap();
        });
    }

    #[test]
    fn a_page_the_source_cannot_give_fails_the_restore_and_calls_for_the_kill() {
        let (region, uffd) = Region::new(64);
        let (mut d, shared) = daemon(Pattern { fail_from: 16 * P });
        d.tasks.push(task(&region, uffd, 64));
        d.finished = true;
        let (tx, rx) = std::sync::mpsc::channel();
        d.run(Box::new(move |why| tx.send(why.to_string()).unwrap()));
        let why = rx.try_recv().expect("on_failure was called");
        assert!(why.contains("does not match its digest"), "{why}");
        assert!(matches!(&*shared.state.lock().unwrap(), State::Failed(w) if *w == why));
    }

    #[test]
    fn remapped_pages_are_found_at_their_new_address() {
        let mut r = ranges(&[(0, 4 * P, 0)]);
        r.remap(2 * P, 100 * P, 2 * P);
        assert_eq!(r, ranges(&[(0, 2 * P, 0), (100 * P, 102 * P, 2 * P)]));
    }
}
