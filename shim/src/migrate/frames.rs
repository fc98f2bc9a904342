//! An archive's bytes as a sequence of independent zstd frames, one per
//! chunk, each compressed or stored as the moment requires.
//!
//! Why not one zstd stream: compressing real programs' memory runs at about
//! 560 MB/s on two cores of these machines (`zstd -1`, 3.6:1), slower than
//! a local disk or a fast share (GB/s). Every byte passing through the
//! compressor then costs downtime. Cut into chunks, each chunk can go out
//! compressed when the destination is the bottleneck (a slow share: fewer
//! bytes to write) and stored when the compressor would be (a fast share:
//! a stored frame costs a copy). [`Mode::Adaptive`] decides per chunk:
//! compress while finished chunks wait for the writer and the destination
//! time a compressed chunk saves (the bytes it does not write, at the
//! measured compression ratio) exceeds what compressing it costs (both
//! speeds measured as they go). Incompressible memory is stored.
//! A backlog alone is not enough: on two cores shared with CRIU and the
//! hasher, the writer falls behind for want of CPU, and compressing then
//! only takes more of it.
//!
//! The writer also paces the page cache: every few MiB it starts writeback
//! of what it wrote and waits for the window before, so what the writer
//! measures is the destination's real speed, not the page cache's, and the
//! final fsync of the archive has little left to do. Without that, a
//! multi-GiB archive sits dirty in memory until the fsync, the kernel's
//! dirty-page throttling slows CRIU's own writes meanwhile, and the
//! adaptive choice sees a fast destination where there is a slow disk.
//!
//! A stored chunk is a zstd frame of raw blocks, so every zstd decoder
//! (`zstd -d`, checkpointctl, ours) reads the concatenation as one stream.
//! Frames also allow what one stream cannot: patching bytes already
//! written. A [`Slot`] is a stored frame of exactly one 512-byte block (a
//! tar header) whose content is written once known, which is how a member
//! still growing (CRIU's page images during the dump) can be archived
//! before its size is known.
//!
//! The writer also records every frame ([`FrameRecord`]: where it is,
//! how many archive bytes it decodes to, and the digest of its bytes as
//! written, BLAKE3 since format 3). The manifest carries that table, so a
//! reader can fetch and verify any part of the archive alone (a lazy
//! restore serving one page from the share) with the same trust as the
//! whole.

use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::manifest::FrameDigest;

/// Bytes per chunk (and so per frame).
pub const CHUNK: usize = 1 << 20;
/// Chunks in flight between the producer and the writer.
const DEPTH: usize = 16;
/// Adaptive: compress while at least this many finished chunks wait to be
/// written (the writer is the bottleneck).
const BACKLOG_TO_COMPRESS: usize = 2;
/// Adaptive, writer behind and slower per byte than a compressor, but the
/// ratio says compression does not pay: one chunk in this many is
/// compressed anyway to keep the ratio current.
const PROBE_EVERY: u32 = 16;
/// Until measured: one core compresses real programs' memory at about
/// 370 MB/s with zstd -1 here.
const COMPRESS_NS_PER_MIB: u64 = 2_800_000;
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Writeback is started every this many bytes written.
const WRITEBACK_WINDOW: u64 = 8 << 20;
/// The largest raw block zstd allows.
const MAX_BLOCK: usize = 128 << 10;
/// A slot's frame: magic, descriptor, 4-byte content size, block header.
const SLOT_HEADER: u64 = 4 + 1 + 4 + 3;
pub const SLOT_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No frames: the bytes as they are (a plain tar).
    Plain,
    /// Every chunk compressed at `level` on `workers` threads.
    Compressed { level: i32, workers: u32 },
    /// Each chunk compressed or stored, whichever keeps up (see above).
    Adaptive { level: i32, workers: u32 },
}

/// How many chunks went out which way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    pub stored: u64,
    pub compressed: u64,
    /// Chunks that found the writer behind (the share was the bottleneck).
    pub backlogged: u64,
    /// At the end: microseconds per MiB of the destination and of one
    /// compressor, and the compression ratio (thousandths), as measured.
    pub write_us_per_mib: u64,
    pub compress_us_per_mib: u64,
    pub ratio_milli: u64,
}

/// A place for 512 bytes, reserved in the stream now, filled later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(usize);

/// One frame as written: at `at` in the file, `len` bytes, decoding to
/// `raw_len` bytes of the archive (the tar stream) that follow the ones of
/// the frames before it; `digest` of its `len` bytes ([`FrameDigest::CURRENT`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRecord {
    pub at: u64,
    pub len: u64,
    pub raw_len: u64,
    pub digest: [u8; 32],
}

enum Item {
    /// A frame and the raw bytes it holds.
    Ready(Vec<u8>, usize),
    Compressing(Receiver<io::Result<Vec<u8>>>, usize),
    Slot,
}

type Job = (Vec<u8>, SyncSender<io::Result<Vec<u8>>>);

/// Nanoseconds per MiB of the destination and of one compressor, and the
/// compression ratio (in thousandths), as moving averages.
#[derive(Debug)]
struct Rates {
    write: AtomicU64,
    compress: AtomicU64,
    ratio_milli: AtomicU64,
}

impl Rates {
    fn new() -> Rates {
        Rates {
            // Unknown: assume a fast destination until a write says otherwise.
            write: AtomicU64::new(0),
            compress: AtomicU64::new(COMPRESS_NS_PER_MIB),
            // Real programs' memory: about 3.6:1 with zstd -1.
            ratio_milli: AtomicU64::new(3000),
        }
    }

    fn record_ratio(&self, input: usize, output: usize) {
        let sample = (input as u64 * 1000) / output.max(1) as u64;
        let old = self.ratio_milli.load(Ordering::Relaxed);
        // Half weight: memory changes kind between mappings; a few
        // chunks are enough to follow.
        self.ratio_milli
            .store((old + sample) / 2, Ordering::Relaxed);
    }

    fn record(slot: &AtomicU64, bytes: usize, took: Duration) {
        if bytes < 64 << 10 {
            return;
        }
        let sample = (took.as_nanos() as u64).saturating_mul(1 << 20) / bytes as u64;
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 3 + sample) / 4
        };
        slot.store(new, Ordering::Relaxed);
    }

    /// Writing a byte takes longer than compressing it: compression would
    /// pay at a good enough ratio (worth probing for one).
    fn destination_is_slower(&self) -> bool {
        self.write.load(Ordering::Relaxed) > self.compress.load(Ordering::Relaxed)
    }

    /// Compressing a chunk saves more of the destination's time than it
    /// costs a compressor: writing 1/ratio of it instead of all of it.
    /// Incompressible memory (ratio ~1) saves nothing: stored. One
    /// compressor's time, not the pool's: measured on the wall, it counts
    /// the CPU CRIU and the rest take, and on two cores a pool of two
    /// does not compress twice as fast (tried: a 250 MB/s disk next to
    /// two busy cores moved 192 MiB/s with the pool's time, against
    /// 243 MiB/s with one compressor's; compressors took 8 ms/MiB there).
    fn compressing_pays(&self) -> bool {
        let write = self.write.load(Ordering::Relaxed) as u128;
        let ratio = self.ratio_milli.load(Ordering::Relaxed).max(1000) as u128;
        let saved = write * (ratio - 1000) / ratio;
        saved > self.compress.load(Ordering::Relaxed) as u128
    }
}

/// What `body` writes into: chunks go to the writer thread (compressed on
/// worker threads when the mode says so).
pub struct Sink {
    mode: Mode,
    buf: Vec<u8>,
    order: SyncSender<Item>,
    jobs: Option<SyncSender<Job>>,
    /// Finished chunks not yet written.
    waiting: Arc<AtomicUsize>,
    rates: Arc<Rates>,
    slots: usize,
    fills: Vec<(Slot, [u8; SLOT_LEN])>,
    stats: FrameStats,
    /// Chunks since the last one compressed: adaptive compresses one in
    /// [`PROBE_EVERY`] anyway while a slow writer is behind, so the ratio
    /// it decides by follows memory that becomes compressible again.
    since_compressed: u32,
    /// Raw (archive) bytes taken so far, slots included.
    position: u64,
}

impl Sink {
    /// Where the next byte written goes in the archive's raw stream.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Reserves 512 bytes here; [`Sink::fill`] gives their content.
    pub fn slot(&mut self) -> io::Result<Slot> {
        self.flush_chunk()?;
        self.send(Item::Slot)?;
        self.slots += 1;
        self.position += SLOT_LEN as u64;
        Ok(Slot(self.slots - 1))
    }

    /// The content of `slot`, written in place when the stream ends.
    pub fn fill(&mut self, slot: Slot, bytes: [u8; SLOT_LEN]) {
        self.fills.push((slot, bytes));
    }

    fn send(&self, item: Item) -> io::Result<()> {
        self.order
            .send(item)
            .map_err(|_| io::Error::other("the archive writer stopped"))
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let raw = chunk.len();
        let compress = match self.mode {
            Mode::Plain => false,
            Mode::Compressed { .. } => true,
            Mode::Adaptive { .. } => {
                let behind = self.waiting.load(Ordering::Relaxed) >= BACKLOG_TO_COMPRESS;
                self.stats.backlogged += u64::from(behind);
                behind
                    && (self.rates.compressing_pays()
                        || (self.since_compressed >= PROBE_EVERY
                            && self.rates.destination_is_slower()))
            }
        };
        match (&self.jobs, compress) {
            (Some(jobs), true) => {
                self.stats.compressed += 1;
                self.since_compressed = 0;
                let (tx, rx) = sync_channel(1);
                jobs.send((chunk, tx))
                    .map_err(|_| io::Error::other("the compressors stopped"))?;
                self.send(Item::Compressing(rx, raw))
            }
            _ => {
                self.since_compressed = self.since_compressed.saturating_add(1);
                let frame = if self.mode == Mode::Plain {
                    chunk
                } else {
                    self.stats.stored += 1;
                    stored_frame(&chunk)
                };
                self.waiting.fetch_add(1, Ordering::Relaxed);
                self.send(Item::Ready(frame, raw))
            }
        }
    }
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.position += n as u64;
        if self.buf.len() == CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where frames go: a seekable writer that can start writeback of a range
/// and wait for the ranges before it (a file), or not (memory, in tests).
pub trait Destination: Write + Seek + Send {
    /// Starts writeback of `window`, then waits until `previous` is written.
    fn writeback(&self, _window: Range<u64>, _previous: Range<u64>) -> io::Result<()> {
        Ok(())
    }
}

impl Destination for &mut std::fs::File {
    fn writeback(&self, window: Range<u64>, previous: Range<u64>) -> io::Result<()> {
        use libc::{
            SYNC_FILE_RANGE_WAIT_AFTER, SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE,
        };
        sync_file_range(self, window, SYNC_FILE_RANGE_WRITE)?;
        if previous.is_empty() {
            return Ok(());
        }
        let wait = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
        sync_file_range(self, previous, wait)
    }
}

fn sync_file_range(file: &std::fs::File, r: Range<u64>, flags: libc::c_uint) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on a descriptor `file` owns; it reads no
    // memory of ours.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            r.start as i64,
            (r.end - r.start) as i64,
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // File systems without it: the final fsync does it all.
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(e),
    }
}

impl Destination for io::Cursor<Vec<u8>> {}

/// What [`write_framed`] wrote.
pub struct Framed<T, W> {
    /// What the body returned.
    pub value: T,
    pub out: W,
    /// Bytes written.
    pub len: u64,
    pub stats: FrameStats,
    /// Every frame, in order (none for [`Mode::Plain`]).
    pub frames: Vec<FrameRecord>,
}

/// Runs `body` with a [`Sink`] whose bytes end up in `out` as `mode`
/// says. Slots are filled before this returns.
pub fn write_framed<W, T, E>(
    out: W,
    mode: Mode,
    body: impl FnOnce(&mut Sink) -> Result<T, E>,
) -> Result<Framed<T, W>, E>
where
    W: Destination,
    E: From<io::Error>,
{
    let (order_tx, order_rx) = sync_channel::<Item>(DEPTH);
    let waiting = Arc::new(AtomicUsize::new(0));
    let rates = Arc::new(Rates::new());
    let (level, workers) = match mode {
        Mode::Plain => (0, 0),
        Mode::Compressed { level, workers } | Mode::Adaptive { level, workers } => {
            (level, workers.max(1))
        }
    };
    std::thread::scope(|scope| {
        let jobs = (workers > 0).then(|| {
            let (tx, rx) = sync_channel::<Job>(workers as usize * 2);
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..workers {
                let (rx, waiting, rates) = (rx.clone(), waiting.clone(), rates.clone());
                scope.spawn(move || compressor(&rx, level, &waiting, &rates));
            }
            tx
        });
        let (writer_waiting, writer_rates) = (waiting.clone(), rates.clone());
        let stored = mode != Mode::Plain;
        let writer =
            scope.spawn(move || writer(out, order_rx, &writer_waiting, &writer_rates, stored));
        let mut sink = Sink {
            mode,
            buf: Vec::with_capacity(CHUNK),
            order: order_tx,
            jobs,
            waiting,
            rates,
            slots: 0,
            fills: Vec::new(),
            stats: FrameStats::default(),
            since_compressed: 0,
            position: 0,
        };
        let result = body(&mut sink).and_then(|t| {
            sink.flush_chunk()?;
            Ok(t)
        });
        let Sink {
            order,
            jobs,
            fills,
            mut stats,
            rates,
            ..
        } = sink;
        stats.write_us_per_mib = rates.write.load(Ordering::Relaxed) / 1000;
        stats.compress_us_per_mib = rates.compress.load(Ordering::Relaxed) / 1000;
        stats.ratio_milli = rates.ratio_milli.load(Ordering::Relaxed);
        // The writer and the compressors end when their channels close.
        drop((order, jobs));
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the archive writer panicked")));
        let t = result?;
        let Written {
            mut out,
            len,
            slots,
            mut frames,
        } = written?;
        for (Slot(i), bytes) in fills {
            let (at, frame) = slots[i];
            out.seek(SeekFrom::Start(at))?;
            out.write_all(&bytes)?;
            if let Some(f) = frames.get_mut(frame) {
                f.digest = FrameDigest::CURRENT.of(&stored_frame(&bytes));
            }
        }
        out.seek(SeekFrom::End(0))?;
        if !stored {
            frames.clear();
        }
        Ok(Framed {
            value: t,
            out,
            len,
            stats,
            frames,
        })
    })
}

fn compressor(jobs: &Mutex<Receiver<Job>>, level: i32, waiting: &AtomicUsize, rates: &Rates) {
    let mut z = zstd::bulk::Compressor::new(level)
        .and_then(|mut z| {
            z.include_checksum(true)?;
            Ok(z)
        })
        .ok();
    loop {
        let job = jobs.lock().map(|rx| rx.recv());
        let Ok(Ok((chunk, done))) = job else { return };
        let started = Instant::now();
        let frame = match &mut z {
            Some(z) => z.compress(&chunk),
            None => Err(io::Error::other("zstd did not start")),
        };
        Rates::record(&rates.compress, chunk.len(), started.elapsed());
        // A chunk that does not shrink goes out stored: as cheap to read.
        let frame = frame.map(|f| {
            rates.record_ratio(chunk.len(), f.len());
            if f.len() >= chunk.len() {
                stored_frame(&chunk)
            } else {
                f
            }
        });
        waiting.fetch_add(1, Ordering::Relaxed);
        let _ = done.send(frame);
    }
}

struct Written<W> {
    out: W,
    len: u64,
    /// Where each slot's 512 bytes are, and its frame's index.
    slots: Vec<(u64, usize)>,
    frames: Vec<FrameRecord>,
}

/// Writes items in order; returns `out`, the bytes written, where each
/// slot's 512 bytes are and every frame. After an error it keeps taking
/// items (so the producer never blocks) and returns the error at the end.
fn writer<W: Destination>(
    mut out: W,
    items: Receiver<Item>,
    waiting: &AtomicUsize,
    rates: &Rates,
    stored: bool,
) -> io::Result<Written<W>> {
    let mut n = 0u64;
    let mut synced = 0u64..0u64;
    // The destination's speed: bytes per window over the time spent
    // writing them, writeback waits included (not the time spent waiting
    // for chunks).
    let mut busy = Duration::ZERO;
    let mut offsets = Vec::new();
    let mut frames = Vec::new();
    let mut failed = None;
    for item in items {
        let (bytes, raw_len) = match item {
            Item::Ready(b, raw) => (b, raw),
            Item::Compressing(rx, raw) => match rx.recv() {
                Ok(Ok(b)) => (b, raw),
                Ok(Err(e)) => {
                    failed.get_or_insert(e);
                    (Vec::new(), 0)
                }
                Err(_) => {
                    failed.get_or_insert(io::Error::other("a compressor stopped"));
                    (Vec::new(), 0)
                }
            },
            Item::Slot => {
                let header = if stored { SLOT_HEADER } else { 0 };
                offsets.push((n + header, frames.len()));
                // Not counted in `waiting`: take it back from below.
                waiting.fetch_add(1, Ordering::Relaxed);
                let b = if stored {
                    stored_frame(&[0u8; SLOT_LEN])
                } else {
                    vec![0u8; SLOT_LEN]
                };
                (b, SLOT_LEN)
            }
        };
        waiting.fetch_sub(1, Ordering::Relaxed);
        if failed.is_some() {
            continue;
        }
        let started = Instant::now();
        if stored {
            frames.push(FrameRecord {
                at: n,
                len: bytes.len() as u64,
                raw_len: raw_len as u64,
                digest: FrameDigest::CURRENT.of(&bytes),
            });
        }
        let mut written = out.write_all(&bytes).map(|()| n += bytes.len() as u64);
        if written.is_ok() && n - synced.end >= WRITEBACK_WINDOW {
            let window = synced.end..n;
            written = out.writeback(window.clone(), synced);
            busy += started.elapsed();
            Rates::record(&rates.write, (window.end - window.start) as usize, busy);
            busy = Duration::ZERO;
            synced = window;
        } else {
            busy += started.elapsed();
        }
        if let Err(e) = written {
            failed = Some(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    out.flush()?;
    Ok(Written {
        out,
        len: n,
        slots: offsets,
        frames,
    })
}

/// `data` as one zstd frame of raw blocks (no compression, no checksum:
/// the frame table's digest covers it).
pub fn stored_frame(data: &[u8]) -> Vec<u8> {
    let blocks = data.len().div_ceil(MAX_BLOCK).max(1);
    let mut f = Vec::with_capacity(data.len() + 9 + 3 * blocks);
    f.extend(ZSTD_MAGIC.to_le_bytes());
    // Single segment, 4-byte content size, no checksum, no dictionary.
    f.push(0xA0);
    f.extend((data.len() as u32).to_le_bytes());
    let mut chunks = data.chunks(MAX_BLOCK).peekable();
    if chunks.peek().is_none() {
        f.extend(block_header(0, true));
    }
    while let Some(block) = chunks.next() {
        f.extend(block_header(block.len(), chunks.peek().is_none()));
        f.extend_from_slice(block);
    }
    f
}

/// A raw block's 3-byte header: last-block bit, type 0 (raw), size.
fn block_header(size: usize, last: bool) -> [u8; 3] {
    let v = (size as u32) << 3 | last as u32;
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    fn decode(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(bytes)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 64 % 7 + i % 3) as u8).collect()
    }

    /// Incompressible bytes (xorshift).
    fn random(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A destination slower than a compressor: 10 ms a write.
    struct Slow(Cursor<Vec<u8>>);

    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            std::thread::sleep(std::time::Duration::from_millis(10));
            self.0.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Seek for Slow {
        fn seek(&mut self, p: SeekFrom) -> io::Result<u64> {
            self.0.seek(p)
        }
    }

    impl Destination for Slow {}

    /// `data` written adaptively into a [`Slow`] destination; what comes
    /// out must decode to it.
    fn adaptive_into_slow(data: &[u8]) -> FrameStats {
        let mode = Mode::Adaptive {
            level: 1,
            workers: 2,
        };
        let f = write_framed::<_, _, io::Error>(Slow(Cursor::new(Vec::new())), mode, |s| {
            s.write_all(data)
        })
        .unwrap();
        assert!(decode(&f.out.0.into_inner()) == data);
        f.stats
    }

    #[test]
    fn a_stored_frame_decodes_to_its_bytes() {
        for len in [0, 1, 511, MAX_BLOCK, MAX_BLOCK + 1, 3 * MAX_BLOCK + 17] {
            let data = sample(len);
            assert_eq!(decode(&stored_frame(&data)), data, "length {len}");
        }
    }

    #[test]
    fn every_mode_writes_a_stream_that_decodes_to_the_input_with_slots_filled() {
        let data = sample(3 * CHUNK + 1234);
        for mode in [
            Mode::Plain,
            Mode::Compressed {
                level: 1,
                workers: 2,
            },
            Mode::Adaptive {
                level: 1,
                workers: 2,
            },
        ] {
            let f = write_framed::<_, _, io::Error>(Cursor::new(Vec::new()), mode, |s| {
                s.write_all(b"head")?;
                let slot = s.slot()?;
                assert_eq!(s.position(), 4 + SLOT_LEN as u64);
                s.write_all(&data)?;
                s.fill(slot, [b'h'; SLOT_LEN]);
                s.write_all(b"tail")
            })
            .unwrap();
            let (n, stats) = (f.len, f.stats);
            let bytes = f.out.into_inner();
            assert_eq!(n, bytes.len() as u64);
            let plain = if mode == Mode::Plain {
                bytes.clone()
            } else {
                decode(&bytes)
            };
            let mut want = b"head".to_vec();
            want.extend([b'h'; SLOT_LEN]);
            want.extend(&data);
            want.extend(b"tail");
            assert!(plain == want, "{mode:?}");
            // The frame table finds and verifies every frame on its own.
            if mode == Mode::Plain {
                assert!(f.frames.is_empty());
            } else {
                let (mut at, mut raw) = (0u64, 0usize);
                for fr in &f.frames {
                    assert_eq!(fr.at, at, "{mode:?}: frames follow each other");
                    let frame = &bytes[fr.at as usize..(fr.at + fr.len) as usize];
                    assert_eq!(
                        fr.digest,
                        *blake3::hash(frame).as_bytes(),
                        "{mode:?}: digest of the frame as written"
                    );
                    let decoded = decode(frame);
                    assert_eq!(decoded.len() as u64, fr.raw_len);
                    assert!(decoded == want[raw..raw + decoded.len()], "{mode:?}");
                    at += fr.len;
                    raw += decoded.len();
                }
                assert_eq!((at, raw), (n, want.len()));
            }
            if let Mode::Compressed { .. } = mode {
                assert_eq!(stats.stored, 0);
                assert!(bytes.len() < data.len() / 4);
            }
        }
    }

    /// A destination slower than the compressor: chunks pile up, so the
    /// adaptive mode compresses.
    #[test]
    fn adaptive_compresses_when_the_destination_is_slow() {
        // The first DEPTH chunks are queued before any write is measured.
        let data = sample(64 * CHUNK);
        let stats = adaptive_into_slow(&data);
        assert!(stats.compressed > stats.stored, "{stats:?}");
        // Nothing waits for the writer yet: the first chunk is stored.
        let mode = Mode::Adaptive {
            level: 1,
            workers: 2,
        };
        let first = write_framed::<_, _, io::Error>(Cursor::new(Vec::new()), mode, |s| {
            s.write_all(&data[..CHUNK])
        })
        .unwrap()
        .stats;
        assert_eq!((first.stored, first.compressed), (1, 0));
    }

    /// Incompressible chunks save nothing even on a slow destination:
    /// after the first few, they go out stored.
    #[test]
    fn adaptive_stores_what_does_not_compress() {
        let data = random(64 * CHUNK);
        let stats = adaptive_into_slow(&data);
        // A few are compressed before the ratio is known (and while those
        // already queued go), then they are stored.
        assert!(stats.compressed * 2 < stats.stored, "{stats:?}");
    }

    /// Incompressible memory, then compressible: the probes notice the
    /// change and most of the second half is compressed.
    #[test]
    fn adaptive_notices_memory_that_compresses_again() {
        let mut data = random(40 * CHUNK);
        data.extend(sample(40 * CHUNK));
        let stats = adaptive_into_slow(&data);
        assert!(stats.compressed >= 20, "{stats:?}");
    }

    #[test]
    fn a_failing_destination_fails_the_write_without_hanging() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl Seek for Full {
            fn seek(&mut self, _: SeekFrom) -> io::Result<u64> {
                Ok(0)
            }
        }
        impl Destination for Full {}
        let data = sample(40 * CHUNK);
        let err = write_framed::<_, _, io::Error>(Full, Mode::Plain, |s| s.write_all(&data));
        assert_eq!(err.err().unwrap().raw_os_error(), Some(libc::ENOSPC));
    }
}
