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

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::Path;

use sha2::Digest;

use super::manifest::{Manifest, Member};
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
    sha256: [u8; 32],
}

/// An archive on the share, read by parts.
pub struct Parts {
    file: File,
    frames: Vec<Frame>,
    what: String,
    cache: VecDeque<(usize, Vec<u8>)>,
    /// Bytes fetched from the share so far.
    pub fetched: u64,
}

impl Parts {
    /// The archive `file` (`len` bytes) of authenticated manifest `m`; None
    /// if the archive has no frame table (a plain tar, or an older shim's),
    /// which can only be read whole.
    pub fn new(file: File, len: u64, m: &Manifest, what: &str) -> Result<Option<Parts>> {
        if m.frames.is_empty() || m.members.iter().any(|x| x.offset.is_none()) {
            return Ok(None);
        }
        let bad = |why: String| {
            Error::InvalidArgument(format!(
                "archive {what} failed verification: its frame table {why}"
            ))
        };
        let mut frames = Vec::with_capacity(m.frames.len());
        let (mut at, mut raw_at) = (0u64, 0u64);
        for (i, f) in m.frames.iter().enumerate() {
            let sha256 = unhex(&f.3).ok_or_else(|| bad(format!("has a bad digest at {i}")))?;
            if f.0 != at || f.1 == 0 || f.1 > MAX_FRAME || f.2 == 0 || f.2 > MAX_RAW {
                return Err(bad(format!("is inconsistent at frame {i}")));
            }
            frames.push(Frame {
                at,
                len: f.1,
                raw_at,
                raw_len: f.2,
                sha256,
            });
            at += f.1;
            raw_at += f.2;
        }
        if at > len {
            return Err(bad(format!("ends past the file ({at} > {len} bytes)")));
        }
        for x in &m.members {
            let end = x.offset.unwrap_or(0).checked_add(x.size);
            if end.is_none_or(|e| e > raw_at) {
                return Err(bad(format!("does not hold all of {}", x.path)));
            }
        }
        Ok(Some(Parts {
            file,
            frames,
            what: what.to_string(),
            cache: VecDeque::new(),
            fetched: 0,
        }))
    }

    /// Fills `buf` with the raw bytes at `raw_at`.
    pub fn read(&mut self, raw_at: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = raw_at + done as u64;
            let i = self.frames.partition_point(|f| f.raw_at + f.raw_len <= at);
            let f = self
                .frames
                .get(i)
                .ok_or_else(|| self.corrupt(format!("nothing at raw offset {at}")))?;
            let from = (at - f.raw_at) as usize;
            let data = self.frame(i)?;
            let n = (data.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[from..from + n]);
            done += n;
        }
        Ok(())
    }

    /// Frame `i`, decoded, from the cache or the share.
    fn frame(&mut self, i: usize) -> Result<&[u8]> {
        if let Some(pos) = self.cache.iter().position(|(k, _)| *k == i) {
            let hit = self.cache.remove(pos).unwrap_or_default();
            self.cache.push_front(hit);
        } else {
            let decoded = self.fetch(i)?;
            if self.cache.len() == CACHED {
                self.cache.pop_back();
            }
            self.cache.push_front((i, decoded));
        }
        Ok(self.cache.front().map(|(_, d)| d.as_slice()).unwrap_or(&[]))
    }

    fn fetch(&mut self, i: usize) -> Result<Vec<u8>> {
        let f = &self.frames[i];
        let mut bytes = vec![0u8; f.len as usize];
        self.file
            .read_exact_at(&mut bytes, f.at)
            .map_err(|e| self.corrupt(format!("frame {i} cannot be read: {e}")))?;
        self.fetched += f.len;
        let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
        if digest != f.sha256 {
            return Err(Error::InvalidArgument(format!(
                "archive {} failed verification: frame {i} (raw bytes {}..{}) does not match \
                 its digest (the archive is corrupt or was modified)",
                self.what,
                f.raw_at,
                f.raw_at + f.raw_len
            )));
        }
        let decoded = zstd::bulk::decompress(&bytes, f.raw_len as usize)
            .map_err(|e| self.corrupt(format!("frame {i} does not decode: {e}")))?;
        if decoded.len() as u64 != f.raw_len {
            return Err(self.corrupt(format!("frame {i} decodes to the wrong length")));
        }
        Ok(decoded)
    }

    fn corrupt(&self, why: String) -> Error {
        Error::InvalidArgument(format!(
            "archive {} is corrupt or truncated ({why}); checkpoint again",
            self.what
        ))
    }
}

/// Writes member `m` whole into `dest` (beneath its path there), checking
/// the tar header in front of it and, at the end, its own SHA-256.
pub fn extract_member(parts: &mut Parts, m: &Member, dest: &Path) -> Result<()> {
    let offset = member_start(parts, m)?;
    let mut f = create(dest, &m.path)?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; MAX_RAW as usize];
    let mut done = 0u64;
    while done < m.size {
        let n = (m.size - done).min(MAX_RAW) as usize;
        parts.read(offset + done, &mut buf[..n])?;
        hash.update(&buf[..n]);
        f.write_all(&buf[..n])
            .map_err(|e| staging_full(&m.path, e))?;
        done += n as u64;
    }
    if super::archive::hex(&hash.finalize()) != m.sha256 {
        return Err(Error::InvalidArgument(format!(
            "archive {} failed verification: checksum mismatch for {} (the archive is corrupt \
             or was modified)",
            parts.what, m.path
        )));
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
    let path = dest.join(name);
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
    }
    super::stage::private_file(&path)
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
