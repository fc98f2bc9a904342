//! Extracting an archive into staging, safely: the shim runs as root and
//! the archive comes from a share other nodes write to, so nothing in it is
//! trusted. Only regular files are accepted, only at the paths our format
//! uses (`checkpoint/NAME` and the known top-level members), each at most
//! once, within count and size limits, created with O_EXCL|O_NOFOLLOW in a
//! fresh directory. Every member is hashed on the way; [`super::verify`]
//! compares the digests with the manifest before anything is used.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::hash_thread::HashThread;
use super::members;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_members: usize,
    pub max_member_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_members: 100_000,
            max_member_bytes: 256 << 30,
            max_total_bytes: 512 << 30,
        }
    }
}

const MAX_MANIFEST: u64 = 16 << 20;
const MAX_MAC: u64 = 1024;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// What was extracted: each member's size and SHA-256, and the manifest.
#[derive(Debug, Default)]
pub struct Unpacked {
    pub members: BTreeMap<String, (u64, String)>,
    pub manifest: Option<Vec<u8>>,
    /// The manifest's MAC, in signed archives.
    pub manifest_mac: Option<Vec<u8>>,
}

/// Extracts `input` (tar, or zstd-compressed tar) into the empty directory `dest`.
pub fn unpack(input: impl Read, dest: &Path, limits: Limits, what: &str) -> Result<Unpacked> {
    let mut input = BufReader::with_capacity(1 << 20, input);
    let head = input
        .fill_buf()
        .map_err(|e| corrupt(what, &format!("cannot read: {e}")))?;
    if head.is_empty() {
        return Err(corrupt(what, "the file is empty"));
    }
    if head.starts_with(&ZSTD_MAGIC) {
        let dec = zstd::stream::read::Decoder::with_buffer(input)
            .map_err(|e| corrupt(what, &e.to_string()))?;
        extract(tar::Archive::new(dec), dest, limits, what)
    } else {
        extract(tar::Archive::new(input), dest, limits, what)
    }
}

fn corrupt(what: &str, why: &str) -> Error {
    Error::InvalidArgument(format!(
        "archive {what} is corrupt or truncated ({why}); checkpoint again or pick another archive"
    ))
}

fn refused(what: &str, member: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("archive {what}: member {member:?} refused: {why}"))
}

fn extract<R: Read>(
    mut ar: tar::Archive<R>,
    dest: &Path,
    limits: Limits,
    what: &str,
) -> Result<Unpacked> {
    let mut out = Unpacked::default();
    let mut total = 0u64;
    let entries = ar.entries().map_err(|e| corrupt(what, &e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(what, &e.to_string()))?;
        let name = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| refused(what, "?", "name is not UTF-8"))?;
        let kind = entry.header().entry_type();
        if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            return Err(refused(
                what,
                &name,
                &format!("only regular files are allowed, this is {kind:?}"),
            ));
        }
        check_member_path(&name).map_err(|why| refused(what, &name, why))?;
        let size = entry
            .header()
            .size()
            .map_err(|e| corrupt(what, &e.to_string()))?;
        if out.members.len() >= limits.max_members {
            return Err(refused(what, &name, "too many members"));
        }
        if size > limits.max_member_bytes {
            return Err(refused(what, &name, "member larger than the limit"));
        }
        total = total.saturating_add(size);
        if total > limits.max_total_bytes {
            return Err(refused(what, &name, "archive larger than the limit"));
        }
        // The manifest and its MAC are kept in memory, not written out.
        let (small, max) = match name.as_str() {
            members::MANIFEST => (Some(&mut out.manifest), MAX_MANIFEST),
            members::MANIFEST_MAC => (Some(&mut out.manifest_mac), MAX_MAC),
            _ => (None, 0),
        };
        if let Some(slot) = small {
            if slot.is_some() {
                return Err(refused(what, &name, "appears twice"));
            }
            if size > max {
                return Err(refused(what, &name, "too large"));
            }
            let mut buf = Vec::with_capacity(size as usize);
            (&mut entry)
                .take(size)
                .read_to_end(&mut buf)
                .map_err(|e| corrupt(what, &e.to_string()))?;
            *slot = Some(buf);
            continue;
        }
        if out.members.contains_key(&name) {
            return Err(refused(what, &name, "appears twice"));
        }
        let (n, sha) = write_member(&mut entry, &dest.join(&name), what)?;
        if n != size {
            return Err(corrupt(what, &format!("{name} is short")));
        }
        out.members.insert(name, (n, sha));
    }
    // The tar reader stops at the end-of-archive marker. Read the rest too:
    // only then does zstd check its frame checksum, and nothing but tar's
    // zero padding may follow the marker.
    let mut rest = ar.into_inner();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if buf[..n].iter().all(|b| *b == 0) => continue,
            Ok(_) => return Err(corrupt(what, "data after the end of the archive")),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(what, &e.to_string())),
        }
    }
    Ok(out)
}

/// Our format's paths only: `checkpoint/<file>` or a known top-level member.
fn check_member_path(name: &str) -> std::result::Result<(), &'static str> {
    let top_level = [
        members::SPEC,
        members::CONFIG,
        members::ROOTFS_DIFF,
        members::DELETED,
        members::STATS,
        members::DUMP_LOG,
        members::MANIFEST,
        members::MANIFEST_MAC,
    ];
    if top_level.contains(&name) {
        return Ok(());
    }
    match name.split_once('/') {
        Some((dir, file))
            if dir == members::IMAGES_DIR
                && !file.is_empty()
                && !file.contains('/')
                && file != "."
                && file != ".." =>
        {
            Ok(())
        }
        _ if name.starts_with('/') => Err("absolute path"),
        _ if name.split('/').any(|c| c == "..") => Err("path traversal ('..')"),
        _ => Err("not a member of the checkpoint format"),
    }
}

fn write_member(entry: &mut impl Read, path: &Path, what: &str) -> Result<(u64, String)> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    // Three stages: this thread decompresses and reads the tar, a helper
    // writes, another hashes. Buffers go round between them.
    const CHUNK: usize = 1 << 20;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(4);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    for _ in 0..6 {
        empty_tx.send(vec![0u8; CHUNK]).expect("fresh channel");
    }
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<(u64, String)> {
            let hasher = HashThread::spawn(empty_tx);
            let mut n = 0u64;
            for (buf, k) in full_rx {
                f.write_all(&buf[..k]).map_err(|e| {
                    Error::io_or_full(
                        format!("write {} unpacking {what}", path.display()),
                        e,
                        "the staging disk is full; free space or set CRIU_SHIM_STAGING_DIR",
                    )
                })?;
                n += k as u64;
                // Back to the reader through the hasher.
                hasher.update(buf, k);
            }
            Ok((n, hasher.finish()))
        });
        let read_result = (|| -> Result<()> {
            for mut buf in empty_rx.iter() {
                let k = read_full(entry, &mut buf).map_err(|e| corrupt(what, &e.to_string()))?;
                if k == 0 || full_tx.send((buf, k)).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        drop(full_tx);
        let written = writer.join().expect("writer thread panicked");
        read_result?;
        written
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_paths_are_our_format_only() {
        for ok in [
            "checkpoint/core-1.img",
            "spec.dump",
            "manifest.json",
            "rootfs-diff.tar",
        ] {
            assert!(check_member_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "checkpoint/../../x",
            "checkpoint/a/b",
            "checkpoint/",
            "checkpoint/..",
            "other/file",
            "etc/cron.d/x",
        ] {
            assert!(check_member_path(bad).is_err(), "{bad}");
        }
    }
}
