//! Writing an archive: a tar stream of the staged files, compressed with
//! zstd on every core by default, each member hashed (SHA-256) as it goes
//! out, and the manifest appended last.
//!
//! Everything streams: pages go from the staging directory through tar and
//! zstd straight into the (temporary) file on the share, so a checkpoint
//! never needs room for a second copy.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::hash_thread::HashThread;
use super::unpack::read_full;

use super::manifest::{Manifest, Member};
use super::members;
use crate::error::{Error, Result};

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
) -> Result<(Manifest, u64)> {
    let counted = Counting { inner: out, n: 0 };
    match compression {
        Compression::None => {
            let (m, c) = write_tar(counted, sources, manifest, mac_key)?;
            Ok((m, c.n))
        }
        Compression::Zstd { level, workers } => {
            manifest.compression = compression.name().into();
            let mut enc = zstd::stream::write::Encoder::new(counted, level)
                .map_err(|e| Error::io("start zstd", e))?;
            enc.include_checksum(true)
                .map_err(|e| Error::io("zstd checksum", e))?;
            if workers > 1 {
                enc.multithread(workers)
                    .map_err(|e| Error::io("zstd workers", e))?;
            }
            let (m, enc) = write_tar(enc, sources, manifest, mac_key)?;
            let c = enc
                .finish()
                .map_err(|e| write_error("the end of the archive", e))?;
            Ok((m, c.n))
        }
    }
}

fn write_tar<W: Write>(
    mut out: W,
    sources: &[Source],
    mut manifest: Manifest,
    mac_key: Option<&[u8]>,
) -> Result<(Manifest, W)> {
    manifest.members.clear();
    for s in sources {
        let file =
            File::open(&s.path).map_err(|e| Error::io(format!("open {}", s.path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", s.path.display()), e))?
            .len();
        let sha256 =
            append_file(&mut out, &s.name, file, size, manifest.created).map_err(|e| match e {
                Error::Io { .. } => e,
                other => Error::Other(format!("{}: {other}", s.path.display())),
            })?;
        manifest.members.push(Member {
            path: s.name.clone(),
            size,
            sha256,
        });
    }
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    write_header(
        &mut out,
        members::MANIFEST,
        json.len() as u64,
        manifest.created,
    )?;
    out.write_all(&json)
        .and_then(|()| pad(&mut out, json.len() as u64))
        .map_err(|e| write_error(members::MANIFEST, e))?;
    if let Some(key) = mac_key {
        let mac = super::mac::sign(key, &json);
        write_header(
            &mut out,
            members::MANIFEST_MAC,
            mac.len() as u64,
            manifest.created,
        )?;
        out.write_all(mac.as_bytes())
            .and_then(|()| pad(&mut out, mac.len() as u64))
            .map_err(|e| write_error(members::MANIFEST_MAC, e))?;
    }
    // The end of a tar archive: two zero blocks.
    out.write_all(&[0u8; 1024])
        .map_err(|e| write_error("the end of the archive", e))?;
    Ok((manifest, out))
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
