//! Writing an archive: a tar stream of the staged files in zstd frames
//! (see [`frames`]), and the manifest appended last. The frame table's
//! digests cover every member; a plain tar (no frames) has each member
//! hashed (SHA-256) as it goes out instead. Hashing every byte once, not
//! twice, matters: a checkpoint hashes all of a container's memory while
//! it competes with CRIU for the node's cores.
//!
//! Readers must authenticate the manifest before they write anything
//! (see [`super::unpack`]), so a compressed archive keeps it findable
//! without decompressing the rest: the members are one zstd frame, the
//! manifest (and its MAC, and tar's end) a second one, and a last,
//! skippable frame ([`INDEX_MAGIC`]) holds the second frame's offset. Any
//! zstd decoder skips that frame, so `zstd -d | tar` and checkpointctl
//! still see one plain tar.
//!
//! Everything streams: pages go from the staging directory through tar and
//! zstd straight into the (temporary) file on the share, so a checkpoint
//! never needs room for a second copy.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::follow::Follow;
use super::frames::{self, Destination, FrameStats, Sink};
use super::hash_thread::HashThread;
use super::unpack::read_full;

use super::manifest::{FrameRef, Manifest, Member};
use super::members;
use crate::error::{Error, Result};

/// A zstd skippable frame's magic (0x184D2A50..5F are skippable); ours
/// holds [`INDEX_TAG`] and the little-endian u64 offset of the manifest's
/// frame.
pub const INDEX_MAGIC: u32 = 0x184D_2A5C;
pub const INDEX_TAG: &[u8; 8] = b"CRSHIDX1";
/// Bytes of the index frame at the end of a compressed archive.
pub const INDEX_LEN: u64 = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// Every chunk compressed.
    Zstd { level: i32, workers: u32 },
    /// Each chunk compressed only while the destination is the bottleneck
    /// (see [`frames`]).
    Adaptive { level: i32, workers: u32 },
}

impl Compression {
    pub fn name(&self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd { .. } | Compression::Adaptive { .. } => "zstd",
        }
    }

    fn mode(&self) -> frames::Mode {
        match *self {
            Compression::None => frames::Mode::Plain,
            Compression::Zstd { level, workers } => frames::Mode::Compressed { level, workers },
            Compression::Adaptive { level, workers } => frames::Mode::Adaptive { level, workers },
        }
    }
}

/// One file to put in the archive under `name`.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub path: PathBuf,
}

/// The archive's files: every image in `images` (as `checkpoint/NAME`) and
/// the named extras that exist.
pub fn sources(images: &Path, extras: &[(&str, PathBuf)]) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(images)
        .map_err(|e| Error::io(format!("read images {}", images.display()), e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        out.push(Source {
            name: format!("{}/{n}", members::IMAGES_DIR),
            path: images.join(&n),
        });
    }
    for (name, path) in extras {
        if path.is_file() {
            out.push(Source {
                name: name.to_string(),
                path: path.clone(),
            });
        }
    }
    Ok(out)
}

/// Writes an archive into `out`: `body` appends the members through a
/// [`Writer`] and returns the manifest (its members are filled in here),
/// which goes last, with its MAC when signing. Returns the final manifest,
/// the bytes written and how the chunks went out.
pub fn write<W: Destination>(
    out: W,
    compression: Compression,
    mac_key: Option<&[u8]>,
    progress: Option<&AtomicU64>,
    body: impl FnOnce(&mut Writer) -> Result<Manifest>,
) -> Result<(Manifest, u64, FrameStats)> {
    let mtime = unix_now();
    // Members need digests of their own exactly when no frames are written.
    let hash_members = compression.mode() == frames::Mode::Plain;
    let framed = frames::write_framed(out, compression.mode(), |sink| {
        let mut w = Writer {
            sink,
            mtime,
            progress,
            members: Vec::new(),
            consume: false,
            hash_members,
        };
        w.directory(members::IMAGES_DIR)?;
        let mut manifest = body(&mut w)?;
        manifest.members = w.members;
        Ok::<_, Error>(manifest)
    })?;
    let (mut manifest, out, n, stats) = (framed.value, framed.out, framed.len, framed.stats);
    manifest.compression = compression.name().into();
    manifest.frames = framed
        .frames
        .iter()
        .map(|f| FrameRef(f.at, f.len, f.raw_len, hex(&f.digest)))
        .collect();
    let mut counted = Counting { inner: out, n };
    match compression {
        Compression::None => write_trailer(&mut counted, &manifest, mac_key)?,
        Compression::Zstd { level, .. } | Compression::Adaptive { level, .. } => {
            // The manifest's own frame, found through the index.
            let offset = counted.n;
            let mut enc = encoder(counted, level)?;
            write_trailer(&mut enc, &manifest, mac_key)?;
            counted = enc
                .finish()
                .map_err(|e| write_error("the end of the archive", e))?;
            let mut index = Vec::with_capacity(INDEX_LEN as usize);
            index.extend(INDEX_MAGIC.to_le_bytes());
            index.extend(16u32.to_le_bytes());
            index.extend(INDEX_TAG);
            index.extend(offset.to_le_bytes());
            counted
                .write_all(&index)
                .map_err(|e| write_error("the archive's index", e))?;
        }
    }
    counted
        .flush()
        .map_err(|e| write_error("the end of the archive", e))?;
    Ok((manifest, counted.n, stats))
}

fn encoder<W: Write>(out: W, level: i32) -> Result<zstd::stream::write::Encoder<'static, W>> {
    let mut enc =
        zstd::stream::write::Encoder::new(out, level).map_err(|e| Error::io("start zstd", e))?;
    enc.include_checksum(true)
        .map_err(|e| Error::io("zstd checksum", e))?;
    Ok(enc)
}

/// Appends members to an archive being written; records each one's size
/// (and SHA-256, in a plain tar) for the manifest.
pub struct Writer<'a, 's> {
    sink: &'s mut Sink,
    mtime: u64,
    progress: Option<&'a AtomicU64>,
    members: Vec<Member>,
    /// Punch out of page images what has been archived (see [`Writer::consume`]).
    consume: bool,
    /// No frame table will cover the members: each needs its own digest.
    hash_members: bool,
}

impl Writer<'_, '_> {
    /// The modification time every member gets (the manifest's `created`).
    pub fn mtime(&self) -> u64 {
        self.mtime
    }

    /// Page images are ours to destroy (a staging copy): each part is
    /// punched out of the file once archived. Their pages then leave the
    /// page cache without ever being written back, so a dump's images
    /// never cost disk bandwidth or count against the kernel's dirty-page
    /// limits while the archive is written.
    pub fn consume(&mut self, yes: bool) {
        self.consume = yes;
    }

    /// Members appended so far.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// checkpointctl looks for the images' directory entry itself.
    fn directory(&mut self, name: &str) -> Result<()> {
        let mut dir = header(0, self.mtime);
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o700);
        dir.set_path(format!("{name}/"))
            .map_err(|e| Error::Other(format!("directory entry: {e}")))?;
        dir.set_cksum();
        self.sink
            .write_all(dir.as_bytes())
            .map_err(|e| write_error(name, e))
    }

    /// A complete file, as member `s.name`.
    pub fn append(&mut self, s: &Source) -> Result<()> {
        let consume = self.consume && members::page_image_id(&s.name).is_some();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(consume)
            .open(&s.path)
            .map_err(|e| Error::io(format!("open {}", s.path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", s.path.display()), e))?
            .len();
        write_header(self.sink, &s.name, size, self.mtime)?;
        let offset = self.sink.position();
        let (n, sha256) = self
            .copy(&s.name, file, size, None, consume)
            .map_err(|e| match e {
                Error::Io { .. } => e,
                other => Error::Other(format!("{}: {other}", s.path.display())),
            })?;
        // A file that grew is caught too: it must end where its size said.
        if n != size {
            return Err(Error::Other(format!(
                "{}: changed size while being archived",
                s.path.display()
            )));
        }
        self.finish_member(&s.name, size, sha256, offset)
    }

    /// A file CRIU is still writing, as member `name`: read as it grows
    /// until `follow` says it is complete; its header (size unknown until
    /// then) is filled in afterwards.
    pub fn append_growing(&mut self, name: &str, file: File, follow: &mut Follow) -> Result<()> {
        let slot = self
            .sink
            .slot()
            .map_err(|e| write_error("a member's header", e))?;
        let consume = self.consume;
        let offset = self.sink.position();
        let (size, sha256) = self.copy(name, file, u64::MAX, Some((follow, name)), consume)?;
        let mut h = header(size, self.mtime);
        h.set_path(name)
            .map_err(|e| Error::Other(format!("member name {name}: {e}")))?;
        h.set_cksum();
        let mut block = [0u8; frames::SLOT_LEN];
        block.copy_from_slice(h.as_bytes());
        self.sink.fill(slot, block);
        self.finish_member(name, size, sha256, offset)
    }

    fn finish_member(
        &mut self,
        name: &str,
        size: u64,
        sha256: Option<String>,
        offset: u64,
    ) -> Result<()> {
        pad(self.sink, size).map_err(|e| write_error(name, e))?;
        self.members.push(Member {
            path: name.to_string(),
            size,
            sha256,
            offset: Some(offset),
        });
        Ok(())
    }

    /// Copies up to `limit` bytes of `file` into the archive (hashing on a
    /// helper thread meanwhile, if members are hashed); with a follower,
    /// waits for the file to grow until it is complete. Returns the bytes
    /// copied and their SHA-256.
    fn copy(
        &mut self,
        name: &str,
        mut file: File,
        limit: u64,
        mut follow: Option<(&mut Follow, &str)>,
        consume: bool,
    ) -> Result<(u64, Option<String>)> {
        let (recycle_tx, recycle_rx) = std::sync::mpsc::sync_channel(8);
        let hasher = self.hash_members.then(|| HashThread::spawn(recycle_tx));
        let mut spare = None;
        let mut done = 0u64;
        let mut last_look = false;
        loop {
            let mut buf = spare
                .take()
                .or_else(|| recycle_rx.try_recv().ok())
                .unwrap_or_else(|| vec![0u8; CHUNK]);
            // One byte past the limit: a complete file that grew shows.
            let want = (limit - done).saturating_add(1).min(CHUNK as u64) as usize;
            let n = read_full(&mut file, &mut buf[..want])
                .map_err(|e| Error::io(format!("read {name}"), e))?;
            if n > 0 {
                self.sink
                    .write_all(&buf[..n])
                    .map_err(|e| write_error(name, e))?;
                if consume {
                    punch(&file, done, n as u64);
                }
                done += n as u64;
                if let Some(p) = self.progress {
                    p.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            match &hasher {
                Some(h) if n > 0 => h.update(buf, n),
                _ => spare = Some(buf),
            }
            if n == want && done <= limit {
                continue;
            }
            match &mut follow {
                Some((f, name)) if !last_look => last_look = !f.may_grow(name)?,
                _ => break,
            }
        }
        Ok((done, hasher.map(HashThread::finish)))
    }
}

/// The manifest, its MAC when signing, and tar's end-of-archive.
fn write_trailer<W: Write>(out: &mut W, manifest: &Manifest, mac_key: Option<&[u8]>) -> Result<()> {
    let json =
        serde_json::to_vec_pretty(manifest).map_err(|e| Error::Other(format!("manifest: {e}")))?;
    write_small(out, members::MANIFEST, &json, manifest.created)?;
    if let Some(key) = mac_key {
        let mac = super::mac::sign(key, &json);
        write_small(out, members::MANIFEST_MAC, mac.as_bytes(), manifest.created)?;
    }
    // The end of a tar archive: two zero blocks.
    out.write_all(&[0u8; 1024])
        .map_err(|e| write_error("the end of the archive", e))
}

fn write_small<W: Write>(out: &mut W, name: &str, data: &[u8], mtime: u64) -> Result<()> {
    write_header(out, name, data.len() as u64, mtime)?;
    out.write_all(data)
        .and_then(|()| pad(out, data.len() as u64))
        .map_err(|e| write_error(name, e))
}

/// Frees `len` bytes at `offset` of `file` (keeping its size). Best
/// effort: a file system without hole punching keeps them until staging
/// is removed.
fn punch(file: &File, offset: u64, len: u64) {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let _ = fallocate(file, flags, offset as i64, len as i64);
}

/// Size of the chunks a member is read, hashed and written in.
const CHUNK: usize = 1 << 20;

fn write_header<W: Write>(out: &mut W, name: &str, size: u64, mtime: u64) -> Result<()> {
    let mut h = header(size, mtime);
    // Our member names are short (`checkpoint/pages-1.img`): no GNU long names.
    h.set_path(name)
        .map_err(|e| Error::Other(format!("member name {name}: {e}")))?;
    h.set_cksum();
    out.write_all(h.as_bytes())
        .map_err(|e| write_error(name, e))
}

/// Zeros up to the next 512-byte block after `size` bytes of data.
fn pad<W: Write>(out: &mut W, size: u64) -> std::io::Result<()> {
    let rem = (size % 512) as usize;
    if rem == 0 {
        Ok(())
    } else {
        out.write_all(&[0u8; 512][..512 - rem])
    }
}

fn header(size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o600);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn write_error(what: &str, e: std::io::Error) -> Error {
    Error::io_or_full(
        format!("write {what} into the archive"),
        e,
        "the share (or staging disk) is full; free space and retry",
    )
}

/// SHA-256 of a small buffer, hashed here (no thread).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
