//! Extracting an archive into staging, safely, and trust before work.
//!
//! The shim runs as root and the archive comes from a share other nodes
//! write to, so nothing in it is trusted, and nothing is written before
//! the manifest is authenticated:
//! 1. [`read_trailer`] finds the manifest (and its MAC) without writing
//!    anything: through the index frame of a compressed archive (one seek,
//!    one small frame decompressed), by walking a plain tar's headers with
//!    seeks, or, for archives of older shims, by one decompressing pass
//!    that keeps nothing;
//! 2. [`super::verify::authenticate`] checks the MAC (with a cluster key),
//!    the manifest's format and every member it lists against the limits;
//!    the staging disk must have room for what it declares;
//! 3. [`extract`] streams the members into a fresh directory: each must be
//!    listed, with the declared size, appear once, be a regular file at a
//!    path of our format, and match its SHA-256 when it ends (a member
//!    without one lies within the frame table, whose every frame is
//!    checked before it is decompressed, see [`Verified`]). Anything else
//!    stops the unpack at once. Files are created 0600 with
//!    O_EXCL|O_NOFOLLOW. A deadline (the Create's, from containerd) stops
//!    it too.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use super::archive::{INDEX_LEN, INDEX_MAGIC, INDEX_TAG};
use super::hash_thread::HashThread;
use super::manifest::Manifest;
use super::members;
use super::parts::FrameTable;
use super::verify::{self, Expected};
use crate::error::{Error, Result};

/// Bounds on what an archive may make us write (see docs/archive-format.md).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_members: usize,
    pub max_member_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_members: 50_000,
            max_member_bytes: 128 << 30,
            max_total_bytes: 256 << 30,
        }
    }
}

impl Limits {
    /// The operator's settings (`CRIU_SHIM_MAX_ARCHIVE_*`).
    pub fn from_config(c: &criu_shim_config::ShimConfig) -> Limits {
        Limits {
            max_members: c.max_archive_members,
            max_member_bytes: c.max_archive_bytes,
            max_total_bytes: c.max_archive_bytes,
        }
    }
}

/// When to give up: containerd's deadline for the Create, if it sent one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Deadline(pub Option<Instant>);

impl Deadline {
    pub fn check(&self, what: &str) -> Result<()> {
        match self.0 {
            Some(t) if Instant::now() >= t => Err(Error::DeadlineExceeded(format!(
                "unpacking {what} stopped: the request's deadline passed (containerd gave up \
                 on it); give the restore more time (the kubelet's runtimeRequestTimeout)"
            ))),
            _ => Ok(()),
        }
    }
}

/// How to unpack.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    pub limits: Limits,
    /// The cluster key: the manifest's MAC must verify under it.
    pub key: Option<&'a [u8]>,
    pub deadline: Deadline,
}

pub(super) const MAX_MANIFEST: u64 = 16 << 20;
pub(super) const MAX_MAC: u64 = 1024;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
const CHUNK: usize = 1 << 20;

/// The manifest and its MAC as found in the archive, not yet believed.
#[derive(Debug, Default)]
pub struct Trailer {
    pub manifest: Option<Vec<u8>>,
    pub mac: Option<Vec<u8>>,
}

/// Authenticates and extracts the archive `file` into the empty directory
/// `dest`; returns the verified manifest. On error the caller removes `dest`.
pub fn unpack(mut file: File, dest: &Path, what: &str, o: &Options) -> Result<Manifest> {
    let trailer = read_trailer(&mut file, what, &o.limits)?;
    let expected = verify::authenticate(&trailer, what, o.key, &o.limits)?;
    unpack_authenticated(file, dest, &expected, what, o.deadline)?;
    Ok(expected.manifest)
}

/// Step 3 alone, for a caller that has authenticated the manifest.
pub fn unpack_authenticated(
    mut file: File,
    dest: &Path,
    expected: &Expected,
    what: &str,
    deadline: Deadline,
) -> Result<()> {
    check_room(dest, expected.total_bytes(), what)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| corrupt(what, &e.to_string()))?;
    extract(file, dest, expected, what, deadline)
}

fn corrupt(what: &str, why: &str) -> Error {
    Error::InvalidArgument(format!(
        "archive {what} is corrupt or truncated ({why}); checkpoint again or pick another archive"
    ))
}

fn over_limits(what: &str) -> Error {
    Error::InvalidArgument(format!(
        "archive {what} refused: it holds more than the limit of members or bytes \
         (CRIU_SHIM_MAX_ARCHIVE_MEMBERS, CRIU_SHIM_MAX_ARCHIVE_BYTES)"
    ))
}

/// A member whose SHA-256 is not the manifest's.
pub(super) fn checksum_mismatch(what: &str, member: &str) -> Error {
    Error::InvalidArgument(format!(
        "archive {what} failed verification: checksum mismatch for {member} (the archive is \
         corrupt or was modified)"
    ))
}

fn refused(what: &str, member: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("archive {what}: member {member:?} refused: {why}"))
}

/// A tar stream over `input`, decompressed if it is zstd.
fn tar_stream<'a, R: Read + 'a>(input: R, what: &str) -> Result<tar::Archive<Box<dyn Read + 'a>>> {
    let mut input = BufReader::with_capacity(CHUNK, input);
    let head = input
        .fill_buf()
        .map_err(|e| corrupt(what, &format!("cannot read: {e}")))?;
    if head.is_empty() {
        return Err(corrupt(what, "the file is empty"));
    }
    let reader: Box<dyn Read + 'a> = if head.starts_with(&ZSTD_MAGIC) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| corrupt(what, &e.to_string()))?,
        )
    } else {
        Box::new(input)
    };
    Ok(tar::Archive::new(reader))
}

/// Finds the manifest and its MAC, writing nothing.
pub fn read_trailer(file: &mut File, what: &str, limits: &Limits) -> Result<Trailer> {
    let size = file
        .metadata()
        .map_err(|e| corrupt(what, &e.to_string()))?
        .len();
    let mut head = [0u8; 4];
    let n = read_full(file, &mut head).map_err(|e| corrupt(what, &e.to_string()))?;
    if n == 0 {
        return Err(corrupt(what, "the file is empty"));
    }
    if head != ZSTD_MAGIC {
        file.seek(SeekFrom::Start(0))
            .map_err(|e| corrupt(what, &e.to_string()))?;
        return trailer_of_plain_tar(file, what, limits);
    }
    if let Some(offset) = index_offset(file, size).map_err(|e| corrupt(what, &e.to_string()))? {
        if offset >= size.saturating_sub(INDEX_LEN) {
            return Err(corrupt(what, "its index points past the end"));
        }
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| corrupt(what, &e.to_string()))?;
        let frame = (&*file).take(size - INDEX_LEN - offset);
        let ar = tar_stream(frame, what)?;
        return collect_trailer(ar, what, 3, u64::MAX);
    }
    // An archive of an older shim: one pass that decompresses and keeps
    // nothing but the manifest and its MAC.
    file.seek(SeekFrom::Start(0))
        .map_err(|e| corrupt(what, &e.to_string()))?;
    let ar = tar_stream(&*file, what)?;
    collect_trailer(ar, what, limits.max_members + 2, limits.max_total_bytes)
}

/// The offset the index frame at the end of `file` holds, if it has one.
fn index_offset(file: &mut File, size: u64) -> std::io::Result<Option<u64>> {
    if size < INDEX_LEN {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(size - INDEX_LEN))?;
    let mut b = [0u8; INDEX_LEN as usize];
    file.read_exact(&mut b)?;
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    if magic != INDEX_MAGIC || len != 16 || &b[8..16] != INDEX_TAG {
        return Ok(None);
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[16..24]);
    Ok(Some(u64::from_le_bytes(off)))
}

/// Reads tar entries, keeping only the manifest and MAC (bounded), at most
/// `max_entries` entries and `max_bytes` of member data.
fn collect_trailer<R: Read>(
    mut ar: tar::Archive<R>,
    what: &str,
    max_entries: usize,
    max_bytes: u64,
) -> Result<Trailer> {
    let mut t = Trailer::default();
    let (mut count, mut bytes) = (0usize, 0u64);
    // Raw entries: the tar crate reads GNU long names and PAX headers of
    // any size into memory; our format has none, so they are refused as
    // members instead.
    let entries = ar
        .entries()
        .map_err(|e| corrupt(what, &e.to_string()))?
        .raw(true);
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(what, &e.to_string()))?;
        count += 1;
        let size = entry.size();
        bytes = bytes.saturating_add(size);
        if count > max_entries || bytes > max_bytes {
            return Err(over_limits(what));
        }
        let name = entry.path_bytes().into_owned();
        keep_small(&mut t, &name, &mut entry, size, what)?;
    }
    Ok(t)
}

/// Keeps `entry` in `t` if it is the manifest or its MAC.
fn keep_small(
    t: &mut Trailer,
    name: &[u8],
    entry: &mut impl Read,
    size: u64,
    what: &str,
) -> Result<()> {
    let (slot, max, member) = match name {
        n if n == members::MANIFEST.as_bytes() => {
            (&mut t.manifest, MAX_MANIFEST, members::MANIFEST)
        }
        n if n == members::MANIFEST_MAC.as_bytes() => (&mut t.mac, MAX_MAC, members::MANIFEST_MAC),
        _ => return Ok(()),
    };
    if slot.is_some() {
        return Err(refused(what, member, "appears twice"));
    }
    if size > max {
        return Err(refused(what, member, "too large"));
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry
        .take(size)
        .read_to_end(&mut buf)
        .map_err(|e| corrupt(what, &e.to_string()))?;
    *slot = Some(buf);
    Ok(())
}

/// A plain tar: walk its headers, seeking over the data.
fn trailer_of_plain_tar(file: &mut File, what: &str, limits: &Limits) -> Result<Trailer> {
    let mut ar = tar::Archive::new(&*file);
    let mut t = Trailer::default();
    let mut count = 0usize;
    let entries = ar
        .entries_with_seek()
        .map_err(|e| corrupt(what, &e.to_string()))?
        .raw(true);
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(what, &e.to_string()))?;
        count += 1;
        if count > limits.max_members + 2 {
            return Err(over_limits(what));
        }
        let name = entry.path_bytes().into_owned();
        let size = entry.size();
        keep_small(&mut t, &name, &mut entry, size, what)?;
    }
    Ok(t)
}

/// The staging disk must hold what the manifest declares, and keep a
/// reserve (5% of it, at most 1 GiB): an archive may not fill the node's
/// disk, even one whose declared sizes are all true.
pub fn check_room(dest: &Path, need: u64, what: &str) -> Result<()> {
    let Ok(st) = nix::sys::statvfs::statvfs(dest) else {
        return Ok(());
    };
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    let size = st.blocks().saturating_mul(st.fragment_size());
    let reserve = (size / 20).min(1 << 30);
    if free < need.saturating_add(reserve) {
        return Err(Error::Other(format!(
            "no space left: archive {what} needs {need} bytes in staging, {} has {free} free \
             (and keeps {reserve} in reserve); free space or set CRIU_SHIM_STAGING_DIR",
            dest.display()
        )));
    }
    Ok(())
}

/// Streams every member into `dest`, each checked against `expected` as it
/// arrives.
fn extract(
    input: File,
    dest: &Path,
    expected: &Expected,
    what: &str,
    deadline: Deadline,
) -> Result<()> {
    let len = input
        .metadata()
        .map_err(|e| corrupt(what, &e.to_string()))?
        .len();
    let table = FrameTable::parse(&expected.manifest, len, what)?;
    let covered = table.as_ref().map_or(0, FrameTable::raw_end);
    let input: Box<dyn Read> = match table {
        Some(table) => Box::new(Verified::new(input, table)),
        None => Box::new(input),
    };
    let mut ar = tar_stream(input, what)?;
    let mut seen = HashSet::new();
    let mut trailer = Trailer::default();
    let entries = ar
        .entries()
        .map_err(|e| corrupt(what, &e.to_string()))?
        .raw(true);
    for entry in entries {
        deadline.check(what)?;
        let mut entry = entry.map_err(|e| corrupt(what, &e.to_string()))?;
        let name = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| refused(what, "?", "name is not UTF-8"))?;
        let size = entry.size();
        if name == members::MANIFEST || name == members::MANIFEST_MAC {
            keep_small(&mut trailer, name.as_bytes(), &mut entry, size, what)?;
            continue;
        }
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::Directory && is_images_dir(&name) && size == 0 {
            continue;
        }
        if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            return Err(refused(
                what,
                &name,
                &format!("only regular files are allowed, this is {kind:?}"),
            ));
        }
        let Some((want_size, want_sha)) = expected.member(&name) else {
            return Err(refused(what, &name, "not in the manifest"));
        };
        if !seen.insert(name.clone()) {
            return Err(refused(what, &name, "appears twice"));
        }
        if size != want_size {
            return Err(refused(what, &name, "its size differs from the manifest's"));
        }
        // Without a digest of its own, every byte must come from a
        // verified frame.
        if want_sha.is_none() && entry.raw_file_position().saturating_add(size) > covered {
            return Err(refused(what, &name, "it lies outside the frame table"));
        }
        let hash = want_sha.is_some();
        let (n, sha) = write_member(&mut entry, &dest.join(&name), size, what, deadline, hash)?;
        if n != size {
            return Err(corrupt(what, &format!("{name} is short")));
        }
        if sha.as_deref() != want_sha {
            return Err(checksum_mismatch(what, &name));
        }
    }
    // The stream's manifest must be the one that was authenticated.
    if trailer.manifest.as_deref() != Some(expected.raw.as_slice()) {
        return Err(corrupt(what, "its manifest differs from its index's"));
    }
    if let Some(missing) = expected.paths().find(|p| !seen.contains(*p)) {
        return Err(Error::InvalidArgument(format!(
            "archive {what} failed verification: {missing} is missing"
        )));
    }
    finish_stream(ar.into_inner(), what)
}

/// The images' directory entry (for checkpointctl; nothing to write).
fn is_images_dir(name: &str) -> bool {
    name.trim_end_matches('/') == members::IMAGES_DIR
}

/// The tar reader stops at the end-of-archive marker. Read the rest too:
/// only then does zstd check its frame checksum, and nothing but tar's
/// zero padding may follow the marker.
fn finish_stream(mut rest: impl Read, what: &str) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rest.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) if buf[..n].iter().all(|b| *b == 0) => continue,
            Ok(_) => return Err(corrupt(what, "data after the end of the archive")),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(what, &e.to_string())),
        }
    }
}

fn write_member(
    entry: &mut impl Read,
    path: &Path,
    size: u64,
    what: &str,
    deadline: Deadline,
    hash: bool,
) -> Result<(u64, Option<String>)> {
    let mut f = super::stage::private_file_in_new_dirs(path)?;
    let full = |e: std::io::Error| {
        Error::io_or_full(
            format!("write {} unpacking {what}", path.display()),
            e,
            "the staging disk is full; free space or set CRIU_SHIM_STAGING_DIR",
        )
    };
    if size <= CHUNK as u64 {
        // Small members (most CRIU images): no threads.
        let mut buf = Vec::with_capacity(size as usize);
        entry
            .take(size)
            .read_to_end(&mut buf)
            .map_err(|e| corrupt(what, &e.to_string()))?;
        f.write_all(&buf).map_err(full)?;
        let sha = hash.then(|| super::archive::sha256_hex(&buf));
        return Ok((buf.len() as u64, sha));
    }
    // Three stages: this thread decompresses and reads the tar, a helper
    // writes, another hashes (if asked). Buffers go round between them.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(4);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    for _ in 0..6 {
        let _ = empty_tx.send(vec![0u8; CHUNK]);
    }
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<(u64, Option<String>)> {
            let hasher = hash.then(|| HashThread::spawn(empty_tx.clone()));
            let mut n = 0u64;
            for (buf, k) in full_rx {
                f.write_all(&buf[..k]).map_err(full)?;
                n += k as u64;
                // Back to the reader (through the hasher).
                match &hasher {
                    Some(h) => h.update(buf, k),
                    None => {
                        let _ = empty_tx.try_send(buf);
                    }
                }
            }
            Ok((n, hasher.map(HashThread::finish)))
        });
        let read_result = (|| -> Result<()> {
            for mut buf in empty_rx.iter() {
                deadline.check(what)?;
                let k = read_full(entry, &mut buf).map_err(|e| corrupt(what, &e.to_string()))?;
                if k == 0 || full_tx.send((buf, k)).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        drop(full_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Other("the staging writer failed".into())));
        read_result?;
        written
    })
}

/// The archive file read frame by frame, each frame's digest checked
/// before any of it reaches the decompressor; what follows the table (the
/// manifest's frame, compared byte for byte with the authenticated one,
/// and the index) passes as it is.
pub(super) struct Verified<R> {
    inner: R,
    table: FrameTable,
    next: usize,
    frame: Vec<u8>,
    pos: usize,
}

impl<R: Read> Verified<R> {
    pub fn new(inner: R, table: FrameTable) -> Verified<R> {
        Verified {
            inner,
            table,
            next: 0,
            frame: Vec::new(),
            pos: 0,
        }
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.frame.len() && self.next < self.table.len() {
            let i = self.next;
            self.frame.resize(self.table.frame_len(i) as usize, 0);
            self.inner.read_exact(&mut self.frame)?;
            self.table
                .verify(i, &self.frame)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.next += 1;
            self.pos = 0;
        }
        if self.pos < self.frame.len() {
            let n = out.len().min(self.frame.len() - self.pos);
            out[..n].copy_from_slice(&self.frame[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        self.inner.read(out)
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
