//! Where a lazy restore's memory comes from, and what it fetches before
//! the tasks run.
//!
//! From the share ([`fetch_from_share`]), the archive is read by verified
//! parts ([`crate::migrate::parts`]): every image but the memory pages is
//! extracted (and checked against its digest) into staging; of each page
//! image, only the bytes CRIU itself reads at restore (pages it restores
//! eagerly: stacks, private file mappings; and shared memory, whole) are
//! written, the rest of the file left a hole. The pages userfaultfd serves
//! are then read from the share as the tasks touch them ([`SharePages`]),
//! each frame verified before it is decoded. So the downtime no longer
//! includes copying the memory to the node first.
//!
//! An archive without a frame table (an older shim's, or a plain tar) is
//! fetched whole; a lazy restore then serves its pages from staging
//! ([`StagedPages`]), a cold one lets CRIU restore them.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criu_sys::images::ImageError;
use criu_sys::memory::task_memory;

use super::lazy::PageSource;
use crate::error::{Error, Result};
use crate::migrate::parts::{self, Parts};
use crate::migrate::{members, unpack};
use crate::migrate::{Fetched, Opened};

/// Pages from images already fetched and verified into staging.
pub struct StagedPages {
    dir: PathBuf,
    files: BTreeMap<u32, File>,
    /// The staging directory, kept until every page has moved.
    _keep: Box<dyn Send>,
}

impl StagedPages {
    pub fn new(dir: &Path, keep: Box<dyn Send>) -> StagedPages {
        StagedPages {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            _keep: keep,
        }
    }

    fn file(&mut self, id: u32) -> std::result::Result<&File, String> {
        match self.files.entry(id) {
            Entry::Occupied(f) => Ok(f.into_mut()),
            Entry::Vacant(slot) => {
                let path = self.dir.join(format!("pages-{id}.img"));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                Ok(slot.insert(f))
            }
        }
    }
}

impl PageSource for StagedPages {
    fn read(
        &mut self,
        _: u32,
        id: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), String> {
        self.file(id)?.read_exact_at(buf, offset).map_err(|e| {
            format!(
                "pages-{id}.img: {} bytes at {offset}: {e} (the images are truncated)",
                buf.len()
            )
        })
    }
}

/// A lazy restore's page source.
pub type Source = Box<dyn PageSource>;

/// Pages read from the archive on the share, by verified parts.
pub struct SharePages {
    parts: Parts,
    /// pages-ID.img -> (raw offset of its data, size).
    members: HashMap<u32, (u64, u64)>,
    /// The staging the restore's images are in.
    _keep: Arc<Fetched>,
}

impl PageSource for SharePages {
    fn read(
        &mut self,
        _: u32,
        id: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), String> {
        let &(at, size) = self
            .members
            .get(&id)
            .ok_or_else(|| format!("the archive has no pages-{id}.img"))?;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(format!(
                "pages-{id}.img has no bytes {offset}..+{} (it holds {size})",
                buf.len()
            ));
        }
        self.parts.read(at + offset, buf).map_err(|e| e.to_string())
    }
}

/// Fetches what the restore needs before CRIU runs (see the module doc);
/// returns the staging and where the rest of the memory comes from, or
/// None when the archive had to be fetched whole (no frame table).
/// `timeout`: longest the tasks wait for the share to give a page before
/// the restore fails (a cut network, a dead file server).
pub fn fetch_from_share(
    opened: Opened,
    timeout: Duration,
) -> Result<(Arc<Fetched>, Option<Source>)> {
    let deadline = opened.deadline;
    let Some(mut parts) = opened.parts()? else {
        log::info!(
            "{}: no frame table (a plain tar, or an older shim's archive): fetched whole",
            opened.archive.display()
        );
        return Ok((Arc::new(opened.fetch_all()?), None));
    };
    let what = opened.archive.display().to_string();
    let dest = opened.staging.path().to_path_buf();
    let (pages, others): (Vec<_>, Vec<_>) = opened
        .manifest()
        .members
        .iter()
        .cloned()
        .partition(|m| members::page_image_id(&m.path).is_some());
    unpack::check_room(&dest, others.iter().map(|m| m.size).sum(), &what)?;
    for m in &others {
        deadline.check(&what)?;
        parts::extract_member(&mut parts, m, &dest)?;
    }
    let lazy = lazy_offsets(&opened.staging.images())?;
    let mut members = HashMap::new();
    for m in &pages {
        deadline.check(&what)?;
        let id = members::page_image_id(&m.path).unwrap_or_default();
        match lazy.get(&id) {
            Some(served) => {
                parts::extract_ranges(&mut parts, m, &dest, &complement(served, m.size))?
            }
            None => parts::extract_member(&mut parts, m, &dest)?,
        }
        members.insert(id, (m.offset.unwrap_or_default(), m.size));
    }
    log::info!(
        "{what}: {} MiB fetched before the restore; the other {} MiB of memory are served \
         as the tasks touch them",
        parts.fetched() >> 20,
        lazy.values().flatten().map(|(s, e)| e - s).sum::<u64>() >> 20
    );
    // From here on the tasks wait for pages: fetch ahead of them, and
    // give up on a share that stops answering rather than hang them.
    parts.read_ahead(timeout);
    let fetched = Arc::new(opened.into_fetched());
    let source = SharePages {
        parts,
        members,
        _keep: fetched.clone(),
    };
    Ok((fetched, Some(Box::new(source))))
}

/// For every page image that holds lazily restored memory: the byte
/// ranges userfaultfd serves (sorted, merged).
fn lazy_offsets(images: &Path) -> Result<HashMap<u32, Vec<(u64, u64)>>> {
    let unreadable = |e: ImageError| {
        Error::InvalidArgument(format!(
            "the archive's memory images cannot be read ({e}); checkpoint again"
        ))
    };
    let mut by_image: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    for p in criu_sys::images::process_tree(images).map_err(unreadable)? {
        let m = match task_memory(images, p.pid) {
            Ok(m) => m,
            // A zombie has no memory images.
            Err(ImageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(unreadable(e)),
        };
        by_image
            .entry(m.pages_id)
            .or_default()
            .extend(m.ranges.iter().map(|r| (r.offset, r.offset + r.len())));
    }
    for ranges in by_image.values_mut() {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for &(s, e) in ranges.iter() {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        *ranges = merged;
    }
    Ok(by_image)
}

/// The parts of `[0, size)` outside `served` (sorted, disjoint).
fn complement(served: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(s, e) in served {
        if s > at {
            out.push((at, s.min(size)));
        }
        at = at.max(e);
    }
    if at < size {
        out.push((at, size));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_criu_reads_itself_is_what_userfaultfd_does_not_serve() {
        assert_eq!(
            complement(&[(4, 8), (8, 12), (20, 24)], 30),
            vec![(0, 4), (12, 20), (24, 30)]
        );
        assert_eq!(complement(&[], 5), vec![(0, 5)]);
        assert_eq!(complement(&[(0, 5)], 5), vec![]);
        assert_eq!(members::page_image_id("checkpoint/pages-12.img"), Some(12));
        assert_eq!(members::page_image_id("checkpoint/pagemap-12.img"), None);
        assert_eq!(members::page_image_id("rootfs-diff.tar"), None);
    }
}
