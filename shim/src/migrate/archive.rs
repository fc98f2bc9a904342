//! Writing an archive: a tar stream of the staged files, compressed with
//! zstd on every core by default, each member hashed (SHA-256) as it goes
//! out, and the manifest appended last.
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
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::hash_thread::HashThread;
use super::unpack::read_full;

use super::manifest::{Manifest, Member};
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
    None,
    Zstd { level: i32, workers: u32 },
}

impl Compression {
    pub fn name(&self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd { .. } => "zstd",
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

/// Streams `sources` and then the manifest into `out`. Returns the final
/// manifest (with every member's digest) and the number of bytes written.
pub fn write<W: Write>(
    out: W,
    sources: &[Source],
    mut manifest: Manifest,
    compression: Compression,
    mac_key: Option<&[u8]>,
    progress: Option<&AtomicU64>,
) -> Result<(Manifest, u64)> {
    let counted = Counting { inner: out, n: 0 };
    manifest.compression = compression.name().into();
    match compression {
        Compression::None => {
            let (members, mut c) = write_members(counted, sources, manifest.created, progress)?;
            manifest.members = members;
            write_trailer(&mut c, &manifest, mac_key)?;
            Ok((manifest, c.n))
        }
        Compression::Zstd { level, workers } => {
            let enc = encoder(counted, level, workers)?;
            let (members, enc) = write_members(enc, sources, manifest.created, progress)?;
            manifest.members = members;
            let counted = enc
                .finish()
                .map_err(|e| write_error("the archive's members", e))?;
            // The manifest's own frame, single-threaded: it is small.
            let offset = counted.n;
            let mut enc = encoder(counted, level, 1)?;
            write_trailer(&mut enc, &manifest, mac_key)?;
            let mut counted = enc
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
            Ok((manifest, counted.n))
        }
    }
}

fn encoder<W: Write>(
    out: W,
    level: i32,
    workers: u32,
) -> Result<zstd::stream::write::Encoder<'static, W>> {
    let mut enc =
        zstd::stream::write::Encoder::new(out, level).map_err(|e| Error::io("start zstd", e))?;
    enc.include_checksum(true)
        .map_err(|e| Error::io("zstd checksum", e))?;
    if workers > 1 {
        enc.multithread(workers)
            .map_err(|e| Error::io("zstd workers", e))?;
    }
    Ok(enc)
}

/// Every source as a tar member; their manifest entries.
fn write_members<W: Write>(
    mut out: W,
    sources: &[Source],
    mtime: u64,
    progress: Option<&AtomicU64>,
) -> Result<(Vec<Member>, W)> {
    // checkpointctl looks for the images' directory entry itself.
    let mut dir = header(0, mtime);
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o700);
    dir.set_path(format!("{}/", members::IMAGES_DIR))
        .map_err(|e| Error::Other(format!("directory entry: {e}")))?;
    dir.set_cksum();
    out.write_all(dir.as_bytes())
        .map_err(|e| write_error(members::IMAGES_DIR, e))?;
    let mut members = Vec::with_capacity(sources.len());
    for s in sources {
        let file =
            File::open(&s.path).map_err(|e| Error::io(format!("open {}", s.path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", s.path.display()), e))?
            .len();
        let sha256 =
            append_file(&mut out, &s.name, file, size, mtime, progress).map_err(|e| match e {
                Error::Io { .. } => e,
                other => Error::Other(format!("{}: {other}", s.path.display())),
            })?;
        members.push(Member {
            path: s.name.clone(),
            size,
            sha256,
        });
    }
    Ok((members, out))
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

/// Size of the chunks a member is read, hashed and written in.
const CHUNK: usize = 1 << 20;

/// One tar member from `file`, `size` bytes; returns its SHA-256, hashed
/// on a helper thread while this one reads and writes the next chunk.
fn append_file<W: Write>(
    out: &mut W,
    name: &str,
    mut file: File,
    size: u64,
    mtime: u64,
    progress: Option<&AtomicU64>,
) -> Result<String> {
    write_header(out, name, size, mtime)?;
    let (recycle_tx, recycle_rx) = std::sync::mpsc::sync_channel(8);
    let hasher = HashThread::spawn(recycle_tx);
    let mut left = size;
    while left > 0 {
        let mut buf = recycle_rx.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
        let want = left.min(CHUNK as u64) as usize;
        let n = read_full(&mut file, &mut buf[..want])
            .map_err(|e| Error::io(format!("read {name}"), e))?;
        if n < want {
            break;
        }
        out.write_all(&buf[..n]).map_err(|e| write_error(name, e))?;
        hasher.update(buf, n);
        left -= n as u64;
        if let Some(p) = progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    // A file that grew is caught too: it must end where its size said.
    let mut probe = [0u8; 1];
    if left > 0 || file.read(&mut probe).map(|k| k > 0).unwrap_or(false) {
        return Err(Error::Other("changed size while being archived".into()));
    }
    pad(out, size).map_err(|e| write_error(name, e))?;
    Ok(hasher.finish())
}

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
