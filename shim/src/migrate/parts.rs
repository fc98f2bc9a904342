//! Reading parts of an archive on the share, each part verified on its own.
//!
//! A lazy restore must not wait for the whole archive: the tasks run once
//! their non-memory images are in, and memory is served page by page. The
//! manifest (authenticated before anything is read, see [`super::verify`])
//! lists every frame of the archive with the SHA-256 of its bytes, and
//! where each member starts in the raw (tar) stream. [`Parts`] reads any
//! byte range through that table: it fetches the frames that hold it,
//! checks each one's digest *before* decoding it, and decodes it. So a part
//! is believed on the same grounds as a whole archive: the digests are in
//! the signed manifest.
//!
//! A few decoded frames are kept, since faults and the background copy
//! read neighbouring pages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sha2::Digest;

use super::manifest::{FrameDigest, Manifest, Member};
use crate::error::{Error, Result};

/// Largest raw bytes in one frame (the writer's chunk) and largest frame
/// (a stored chunk plus block headers, with room to spare).
const MAX_RAW: u64 = 1 << 20;
const MAX_FRAME: u64 = 2 << 20;
/// Decoded frames kept.
const CACHED: usize = 8;

struct Frame {
    at: u64,
    len: u64,
    raw_at: u64,
    raw_len: u64,
    digest: [u8; 32],
}

/// An authenticated manifest's frame table, checked to be consistent:
/// frames follow each other from the file's first byte, none is empty or
/// larger than the writer makes them, and they end within the file.
pub(super) struct FrameTable {
    table: Vec<Frame>,
    digest: FrameDigest,
    what: String,
}

impl FrameTable {
    /// The table of `m` for an archive file of `len` bytes; None if it has
    /// none (a plain tar, or an older shim's archive).
    pub fn parse(m: &Manifest, len: u64, what: &str) -> Result<Option<FrameTable>> {
        if m.frames.is_empty() {
            return Ok(None);
        }
        let mut table = Vec::with_capacity(m.frames.len());
        let (mut at, mut raw_at) = (0u64, 0u64);
        for (i, f) in m.frames.iter().enumerate() {
            let digest =
                unhex(&f.3).ok_or_else(|| bad_table(what, format!("has a bad digest at {i}")))?;
            if f.0 != at || f.1 == 0 || f.1 > MAX_FRAME || f.2 == 0 || f.2 > MAX_RAW {
                return Err(bad_table(what, format!("is inconsistent at frame {i}")));
            }
            table.push(Frame {
                at,
                len: f.1,
                raw_at,
                raw_len: f.2,
                digest,
            });
            at += f.1;
            raw_at += f.2;
        }
        if at > len {
            return Err(bad_table(
                what,
                format!("ends past the file ({at} > {len} bytes)"),
            ));
        }
        Ok(Some(FrameTable {
            table,
            digest: FrameDigest::of_version(m.version),
            what: what.to_string(),
        }))
    }

    /// Frames in the table.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// File bytes of frame `i`.
    pub fn frame_len(&self, i: usize) -> u64 {
        self.table[i].len
    }

    /// Raw (tar) bytes the frames decode to: every byte before this is
    /// covered by a digest.
    pub fn raw_end(&self) -> u64 {
        self.table.last().map(|f| f.raw_at + f.raw_len).unwrap_or(0)
    }

    /// `bytes`, read as frame `i`, are what the writer wrote.
    pub fn verify(&self, i: usize, bytes: &[u8]) -> Result<()> {
        let f = &self.table[i];
        if self.digest.of(bytes) != f.digest {
            return Err(Error::InvalidArgument(format!(
                "archive {} failed verification: frame {i} (raw bytes {}..{}) does not match \
                 its digest (the archive is corrupt or was modified)",
                self.what,
                f.raw_at,
                f.raw_at + f.raw_len
            )));
        }
        Ok(())
    }
}

fn bad_table(what: &str, why: String) -> Error {
    Error::InvalidArgument(format!(
        "archive {what} failed verification: its frame table {why}"
    ))
}

/// The archive and its frame table: what any reader of a part needs.
struct Frames {
    file: File,
    table: FrameTable,
    /// Bytes fetched from the share so far.
    fetched: AtomicU64,
}

impl Frames {
    /// Frame `i`, read, verified, decoded.
    fn fetch(&self, i: usize) -> Result<Vec<u8>> {
        let f = &self.table.table[i];
        let mut bytes = vec![0u8; f.len as usize];
        self.file
            .read_exact_at(&mut bytes, f.at)
            .map_err(|e| self.corrupt(format!("frame {i} cannot be read: {e}")))?;
        self.fetched.fetch_add(f.len, Ordering::Relaxed);
        self.table.verify(i, &bytes)?;
        let decoded = zstd::bulk::decompress(&bytes, f.raw_len as usize)
            .map_err(|e| self.corrupt(format!("frame {i} does not decode: {e}")))?;
        if decoded.len() as u64 != f.raw_len {
            return Err(self.corrupt(format!("frame {i} decodes to the wrong length")));
        }
        Ok(decoded)
    }

    fn what(&self) -> &str {
        &self.table.what
    }

    fn corrupt(&self, why: String) -> Error {
        Error::InvalidArgument(format!(
            "archive {} is corrupt or truncated ({why}); checkpoint again",
            self.what()
        ))
    }
}

/// An archive on the share, read by parts.
pub struct Parts {
    frames: Arc<Frames>,
    cache: VecDeque<(usize, Arc<Vec<u8>>)>,
    ahead: Option<ReadAhead>,
}

impl Parts {
    /// The archive `file` (`len` bytes) of authenticated manifest `m`; None
    /// if the archive has no frame table (a plain tar, or an older shim's),
    /// which can only be read whole.
    pub fn new(file: File, len: u64, m: &Manifest, what: &str) -> Result<Option<Parts>> {
        if m.members.iter().any(|x| x.offset.is_none()) {
            return Ok(None);
        }
        let Some(table) = FrameTable::parse(m, len, what)? else {
            return Ok(None);
        };
        let raw_end = table.raw_end();
        for x in &m.members {
            let end = x.offset.unwrap_or(0).checked_add(x.size);
            if end.is_none_or(|e| e > raw_end) {
                return Err(bad_table(what, format!("does not hold all of {}", x.path)));
            }
        }
        Ok(Some(Parts {
            frames: Arc::new(Frames {
                file,
                table,
                fetched: AtomicU64::new(0),
            }),
            cache: VecDeque::new(),
            ahead: None,
        }))
    }

    /// Bytes fetched from the share so far.
    pub fn fetched(&self) -> u64 {
        self.frames.fetched.load(Ordering::Relaxed)
    }

    /// From now on frames come from a helper thread, which fetches,
    /// verifies and decodes the frame asked for and the few after it
    /// while the caller uses the ones before. A frame the share does not
    /// give within `timeout` (a cut network) is an error, not a hang.
    pub fn read_ahead(&mut self, timeout: Duration) {
        self.ahead = Some(ReadAhead::start(self.frames.clone(), timeout));
    }

    /// Fills `buf` with the raw bytes at `raw_at`.
    pub fn read(&mut self, raw_at: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = raw_at + done as u64;
            let table = &self.frames.table.table;
            let i = table.partition_point(|f| f.raw_at + f.raw_len <= at);
            let f = table
                .get(i)
                .ok_or_else(|| self.frames.corrupt(format!("nothing at raw offset {at}")))?;
            let from = (at - f.raw_at) as usize;
            let data = self.frame(i)?;
            let n = (data.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[from..from + n]);
            done += n;
        }
        Ok(())
    }

    /// Frame `i`, decoded, from the cache or the share.
    fn frame(&mut self, i: usize) -> Result<Arc<Vec<u8>>> {
        if let Some(pos) = self.cache.iter().position(|(k, _)| *k == i) {
            let hit = self.cache.remove(pos).unwrap_or_default();
            self.cache.push_front(hit);
        } else {
            let decoded = match &self.ahead {
                Some(ahead) => ahead.get(i, self.frames.table.len())?,
                None => Arc::new(self.frames.fetch(i)?),
            };
            if self.cache.len() == CACHED {
                self.cache.pop_back();
            }
            self.cache.push_front((i, decoded));
        }
        Ok(self
            .cache
            .front()
            .map(|(_, d)| d.clone())
            .unwrap_or_default())
    }

    fn corrupt(&self, why: String) -> Error {
        self.frames.corrupt(why)
    }
}

/// Frames fetched ahead of their use by a helper thread.
struct ReadAhead {
    shared: Arc<(Mutex<Ahead>, Condvar)>,
    timeout: Duration,
}

#[derive(Default)]
struct Ahead {
    /// To fetch, the most urgent first.
    wanted: VecDeque<usize>,
    /// Wanted or being fetched.
    busy: HashSet<usize>,
    ready: HashMap<usize, std::result::Result<Arc<Vec<u8>>, String>>,
    /// The frame the reader waits for: never dropped from `ready`.
    waiting: Option<usize>,
    stop: bool,
}

/// Frames fetched after the one asked for, and most kept ready.
const AHEAD: usize = 4;
const READY: usize = 32;

impl ReadAhead {
    fn start(frames: Arc<Frames>, timeout: Duration) -> ReadAhead {
        let shared = Arc::new((Mutex::new(Ahead::default()), Condvar::new()));
        let worker = shared.clone();
        // Not joined: a thread stuck in a read of a dead share must not hold
        // up the shim; it ends when the read does.
        let _ = std::thread::Builder::new()
            .name("read-ahead".into())
            .spawn(move || fetch_ahead(&frames, &worker));
        ReadAhead { shared, timeout }
    }

    /// Frame `i` of `count`, waiting for the helper at most the timeout.
    fn get(&self, i: usize, count: usize) -> Result<Arc<Vec<u8>>> {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        let found = st.ready.remove(&i);
        if found.is_none() {
            if st.busy.insert(i) {
                st.wanted.push_front(i);
            } else if let Some(pos) = st.wanted.iter().position(|&w| w == i) {
                // Read ahead before, needed now: first.
                st.wanted.remove(pos);
                st.wanted.push_front(i);
            }
        }
        for next in (i + 1..count).take(AHEAD) {
            if !st.ready.contains_key(&next) && st.busy.insert(next) {
                st.wanted.push_back(next);
            }
        }
        cv.notify_all();
        let found = match found {
            Some(r) => r,
            None => {
                st.waiting = Some(i);
                let (mut st, waited) = cv
                    .wait_timeout_while(st, self.timeout, |st| !st.ready.contains_key(&i))
                    .unwrap_or_else(|e| e.into_inner());
                st.waiting = None;
                if waited.timed_out() {
                    return Err(Error::Other(format!(
                        "the share gave no answer for {:?} (frame {i}): is the network to it \
                         cut?",
                        self.timeout
                    )));
                }
                st.ready
                    .remove(&i)
                    .unwrap_or_else(|| Err("frame vanished".into()))
            }
        };
        found.map_err(Error::Other)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_all();
    }
}

fn fetch_ahead(frames: &Frames, shared: &(Mutex<Ahead>, Condvar)) {
    let (lock, cv) = shared;
    loop {
        let i = {
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if st.stop {
                    return;
                }
                if let Some(i) = st.wanted.pop_front() {
                    break i;
                }
                st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let got = frames.fetch(i).map(Arc::new).map_err(|e| e.to_string());
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.busy.remove(&i);
        st.ready.insert(i, got);
        // Keep memory bounded: what is far behind was read ahead in vain
        // (but never the frame the reader waits for).
        while st.ready.len() > READY {
            let waiting = st.waiting;
            let Some(&oldest) = st.ready.keys().filter(|&&k| Some(k) != waiting).min() else {
                break;
            };
            st.ready.remove(&oldest);
        }
        cv.notify_all();
    }
}

/// Writes member `m` whole into `dest` (beneath its path there), checking
/// the tar header in front of it and, if it has one, its own SHA-256 (its
/// bytes come from verified frames either way).
pub fn extract_member(parts: &mut Parts, m: &Member, dest: &Path) -> Result<()> {
    let offset = member_start(parts, m)?;
    let mut f = create(dest, &m.path)?;
    let mut hash = m.sha256.as_ref().map(|_| sha2::Sha256::new());
    let mut buf = vec![0u8; MAX_RAW as usize];
    let mut done = 0u64;
    while done < m.size {
        let n = (m.size - done).min(MAX_RAW) as usize;
        parts.read(offset + done, &mut buf[..n])?;
        if let Some(h) = &mut hash {
            h.update(&buf[..n]);
        }
        f.write_all(&buf[..n])
            .map_err(|e| staging_full(&m.path, e))?;
        done += n as u64;
    }
    if let (Some(h), Some(want)) = (hash, &m.sha256) {
        if super::archive::hex(&h.finalize()) != *want {
            return Err(super::unpack::checksum_mismatch(
                parts.frames.what(),
                &m.path,
            ));
        }
    }
    Ok(())
}

/// Writes only `ranges` (offsets in the member, sorted) of member `m` into
/// a file of its full size; the rest stays a hole. Each byte comes from a
/// verified frame; the member's own digest cannot be checked on a part.
pub fn extract_ranges(
    parts: &mut Parts,
    m: &Member,
    dest: &Path,
    ranges: &[(u64, u64)],
) -> Result<()> {
    let offset = member_start(parts, m)?;
    let f = create(dest, &m.path)?;
    f.set_len(m.size).map_err(|e| staging_full(&m.path, e))?;
    let mut buf = Vec::new();
    for &(start, end) in ranges {
        if start > end || end > m.size {
            return Err(parts.corrupt(format!("{} has no bytes {start}..{end}", m.path)));
        }
        let mut at = start;
        while at < end {
            let n = (end - at).min(MAX_RAW) as usize;
            buf.resize(n, 0);
            parts.read(offset + at, &mut buf)?;
            f.write_all_at(&buf, at)
                .map_err(|e| staging_full(&m.path, e))?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Where `m`'s data starts, after checking the tar header in front of it
/// names it with its size (the manifest and the stream agree).
fn member_start(parts: &mut Parts, m: &Member) -> Result<u64> {
    let offset = m
        .offset
        .filter(|o| *o >= 512)
        .ok_or_else(|| parts.corrupt(format!("{} has no place in the stream", m.path)))?;
    let mut block = [0u8; 512];
    parts.read(offset - 512, &mut block)?;
    let h = tar::Header::from_byte_slice(&block);
    let agrees = h.path_bytes().as_ref() == m.path.as_bytes() && h.size().ok() == Some(m.size);
    if !agrees {
        return Err(parts.corrupt(format!(
            "the header in front of {} does not name it",
            m.path
        )));
    }
    Ok(offset)
}

fn create(dest: &Path, name: &str) -> Result<File> {
    super::stage::private_file_in_new_dirs(&dest.join(name))
}

fn staging_full(name: &str, e: std::io::Error) -> Error {
    Error::io_or_full(
        format!("write {name} into staging"),
        e,
        "the staging disk is full; free space or set CRIU_SHIM_STAGING_DIR",
    )
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
