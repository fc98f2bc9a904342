//! Where a task's memory is in CRIU's images, as a lazy-pages daemon needs it.
//!
//! With `--lazy-pages`, CRIU restores the process tree without the private
//! anonymous pages of its mappings and registers those mappings with
//! userfaultfd; whoever serves the faults must know, for every such page,
//! where its bytes are. CRIU records that in two images per task:
//! - `mm-PID.img`: the mappings (only private, anonymous, unlocked ones that
//!   are not the vDSO can be lazy: `vma_entry_can_be_lazy` in CRIU's vma.h);
//! - `pagemap-PID.img`: runs of pages (`vaddr`, `nr_pages`, flags; CRIU 4
//!   moved the run length to a 64-bit field); the bytes
//!   of the runs flagged PRESENT follow each other in `pages-ID.img`, in
//!   pagemap order. Every dump flags the pages it could restore lazily
//!   (LAZY), whether or not the dump itself was lazy.
//!
//! [`task_memory`] turns the two into [`LazyRange`]s: address runs, split at
//! mapping boundaries (one UFFDIO_COPY never spans two mappings), each with
//! the offset of its bytes in the pages image. Images come from another
//! node: sizes are bounded, runs must be page-aligned, sorted and
//! non-overlapping, and arithmetic is checked, so a hostile image is an
//! error, not a panic or a read outside the pages image.

use std::path::Path;

use protobuf::Message;

use crate::images::{entries, read_bounded, ImageError};
use crate::rpc_images::{Mm_entry, Pagemap_entry, Pagemap_head};

/// `mm-PID.img`'s magic.
pub const MM_MAGIC: u32 = 0x5749_2820;
/// `pagemap-PID.img`'s magic.
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// The page size CRIU's x86-64 images use.
pub const PAGE_SIZE: u64 = 4096;

/// Pagemap flags (CRIU's pagemap.h).
const PE_PARENT: u32 = 1 << 0;
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;

/// mmap flags and CRIU's VMA status bits that decide laziness.
const MAP_PRIVATE: u32 = 0x02;
const MAP_ANONYMOUS: u32 = 0x20;
const MAP_LOCKED: u32 = 0x2000;
const VMA_AREA_VSYSCALL: u32 = 1 << 2;
const VMA_AREA_VDSO: u32 = 1 << 3;

/// Far above any real task's images (65,530 mappings at most by default,
/// and one pagemap entry per run of pages).
const MAX_MM_BYTES: u64 = 16 << 20;
const MAX_PAGEMAP_BYTES: u64 = 256 << 20;
const MAX_ENTRIES: usize = 16 << 20;

/// Pages of one task that a lazy restore leaves for userfaultfd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyRange {
    /// Address of the first page at dump time (and at restore, until the
    /// task remaps it).
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Where `start`'s bytes are in `pages-<pages_id>.img`.
    pub offset: u64,
}

impl LazyRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// A task's lazily restored memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMemory {
    /// The `ID` of the `pages-ID.img` holding the bytes.
    pub pages_id: u32,
    /// Sorted, non-overlapping, each inside one lazy mapping.
    pub ranges: Vec<LazyRange>,
}

impl TaskMemory {
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(LazyRange::len).sum()
    }
}

/// The lazy memory of task `pid` (its pid in the images) in `dir`.
pub fn task_memory(dir: &Path, pid: u32) -> Result<TaskMemory, ImageError> {
    memory_of(dir, pid, Bytes::InImages)
}

/// The memory a lazy dump in `dir` left to its page server, for task
/// `pid`: the runs to ask it for ([`crate::page_xfer`]). The ranges'
/// offsets are 0: the bytes are in no image.
pub fn served_memory(dir: &Path, pid: u32) -> Result<TaskMemory, ImageError> {
    memory_of(dir, pid, Bytes::FromPageServer)
}

/// Where the bytes of lazy runs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bytes {
    /// In `pages-ID.img` (every dump but a lazy one).
    InImages,
    /// With the lazy dump's page server: in no image.
    FromPageServer,
}

fn memory_of(dir: &Path, pid: u32, bytes: Bytes) -> Result<TaskMemory, ImageError> {
    let mm_path = dir.join(format!("mm-{pid}.img"));
    let mm = read_bounded(&mm_path, MAX_MM_BYTES)?;
    let vmas = lazy_vmas(&mm).map_err(|why| ImageError::Malformed {
        path: mm_path.clone(),
        why,
    })?;
    let pm_path = dir.join(format!("pagemap-{pid}.img"));
    let pm = read_bounded(&pm_path, MAX_PAGEMAP_BYTES)?;
    lazy_ranges(&pm, &vmas, bytes).map_err(|why| ImageError::Malformed { path: pm_path, why })
}

/// The mappings CRIU registers with userfaultfd, sorted, as (start, end).
fn lazy_vmas(bytes: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    let entry = entries(bytes, MM_MAGIC, 1, "mm")?
        .into_iter()
        .next()
        .ok_or("no mm entry")?;
    let mm = Mm_entry::parse_from_bytes(entry).map_err(|e| format!("mm entry: {e}"))?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for v in &mm.vmas {
        let (start, end) = (v.start.unwrap_or(0), v.end.unwrap_or(0));
        if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 || end <= start {
            return Err(format!("mapping {start:#x}-{end:#x} is not a page range"));
        }
        if out.last().is_some_and(|&(_, prev_end)| start < prev_end) {
            return Err(format!("mapping {start:#x} overlaps or is out of order"));
        }
        let flags = v.flags.unwrap_or(0);
        let status = v.status.unwrap_or(0);
        let lazy = flags & MAP_ANONYMOUS != 0
            && flags & MAP_PRIVATE != 0
            && flags & MAP_LOCKED == 0
            && status & (VMA_AREA_VDSO | VMA_AREA_VSYSCALL) == 0;
        if lazy {
            out.push((start, end));
        }
    }
    Ok(out)
}

/// Lazy runs of the pagemap, split at mapping boundaries, with their
/// offsets in the pages image.
fn lazy_ranges(bytes: &[u8], vmas: &[(u64, u64)], kind: Bytes) -> Result<TaskMemory, String> {
    let mut all = entries(bytes, PAGEMAP_MAGIC, MAX_ENTRIES, "pagemap")?.into_iter();
    let head = all.next().ok_or("no pagemap head")?;
    let head = Pagemap_head::parse_from_bytes(head).map_err(|e| format!("pagemap head: {e}"))?;
    let mut ranges = Vec::new();
    let mut offset: u64 = 0;
    let mut prev_end: u64 = 0;
    let mut vma = 0;
    for raw in all {
        let e = Pagemap_entry::parse_from_bytes(raw).map_err(|e| format!("pagemap entry: {e}"))?;
        let start = e.vaddr.unwrap_or(0);
        let pages = e
            .nr_pages
            .unwrap_or_else(|| u64::from(e.compat_nr_pages.unwrap_or(0)));
        let len = pages.checked_mul(PAGE_SIZE).ok_or("run too long")?;
        let end = start.checked_add(len).ok_or("run past the address space")?;
        if start % PAGE_SIZE != 0 || len == 0 || start < prev_end {
            return Err(format!(
                "run at {start:#x} ({} pages) is not page-aligned, empty, or before the end of the previous run ({prev_end:#x})",
                len / PAGE_SIZE
            ));
        }
        prev_end = end;
        let flags = e.flags.unwrap_or(0);
        if flags & PE_PARENT != 0 || e.in_parent.unwrap_or(false) {
            return Err("pages in a parent image (an incremental dump) cannot be served lazily from this archive".into());
        }
        let present = flags & PE_PRESENT != 0;
        if flags & PE_LAZY != 0 {
            match (kind, present) {
                (Bytes::InImages, false) => {
                    return Err(format!(
                        "lazy run at {start:#x} has no bytes in the images (dumped for a page \
                         server)"
                    ))
                }
                (Bytes::FromPageServer, true) => {
                    return Err(format!(
                        "lazy run at {start:#x} is in the images: not a lazy dump's"
                    ))
                }
                _ => {}
            }
            while vma < vmas.len() && vmas[vma].1 <= start {
                vma += 1;
            }
            let mut at = start;
            let mut v = vma;
            while at < end && v < vmas.len() && vmas[v].0 < end {
                let (vs, ve) = vmas[v];
                let (s, t) = (at.max(vs), end.min(ve));
                if s < t {
                    let offset = match kind {
                        Bytes::InImages => offset + (s - start),
                        Bytes::FromPageServer => 0,
                    };
                    ranges.push(LazyRange {
                        start: s,
                        end: t,
                        offset,
                    });
                }
                at = t.max(at);
                v += 1;
            }
        }
        if present {
            offset = offset.checked_add(len).ok_or("pages image too large")?;
        }
    }
    Ok(TaskMemory {
        pages_id: head.pages_id.unwrap_or(0),
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::IMG_COMMON_MAGIC;
    use crate::rpc_images::Vma_entry;

    fn image(magic: u32, msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        out.extend_from_slice(&magic.to_le_bytes());
        for m in msgs {
            out.extend_from_slice(&(m.len() as u32).to_le_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    fn mm(vmas: &[(u64, u64, u32, u32)]) -> Vec<u8> {
        let mut m = Mm_entry::new();
        for &(start, end, flags, status) in vmas {
            let mut v = Vma_entry::new();
            v.start = Some(start);
            v.end = Some(end);
            v.flags = Some(flags);
            v.status = Some(status);
            m.vmas.push(v);
        }
        image(MM_MAGIC, &[m.write_to_bytes().unwrap()])
    }

    fn pagemap(id: u32, runs: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut h = Pagemap_head::new();
        h.pages_id = Some(id);
        let mut msgs = vec![h.write_to_bytes().unwrap()];
        for &(vaddr, nr, flags) in runs {
            let mut e = Pagemap_entry::new();
            e.vaddr = Some(vaddr);
            // Old CRIUs' field for small runs, newer ones' for the rest.
            if nr < 4 {
                e.compat_nr_pages = Some(nr as u32);
            } else {
                e.nr_pages = Some(nr);
            }
            e.flags = Some(flags);
            msgs.push(e.write_to_bytes().unwrap());
        }
        image(PAGEMAP_MAGIC, &msgs)
    }

    const ANON: u32 = MAP_PRIVATE | MAP_ANONYMOUS;
    const P: u64 = PAGE_SIZE;

    #[test]
    fn lazy_runs_are_split_at_mappings_and_keep_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        // Two adjacent anonymous mappings, a file mapping, the vDSO.
        std::fs::write(
            dir.path().join("mm-7.img"),
            mm(&[
                (0x10000, 0x10000 + 4 * P, ANON, 1),
                (0x10000 + 4 * P, 0x10000 + 8 * P, ANON, 1),
                (0x40000, 0x40000 + 2 * P, MAP_PRIVATE, 1),
                (0x50000, 0x50000 + P, ANON, VMA_AREA_VDSO),
            ]),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pagemap-7.img"),
            pagemap(
                3,
                &[
                    // Not lazy (a stack page, say): bytes at 0.
                    (0x8000, 1, PE_PRESENT),
                    // One run over both anonymous mappings: bytes at P.
                    (0x10000 + 2 * P, 4, PE_PRESENT | PE_LAZY),
                    // A zero run: no bytes.
                    (0x10000 + 7 * P, 1, 0),
                    // File mapping: bytes at 5P, never lazy.
                    (0x40000, 2, PE_PRESENT),
                ],
            ),
        )
        .unwrap();
        let m = task_memory(dir.path(), 7).unwrap();
        assert_eq!(m.pages_id, 3);
        assert_eq!(
            m.ranges,
            vec![
                LazyRange {
                    start: 0x10000 + 2 * P,
                    end: 0x10000 + 4 * P,
                    offset: P
                },
                LazyRange {
                    start: 0x10000 + 4 * P,
                    end: 0x10000 + 6 * P,
                    offset: 3 * P
                },
            ]
        );
        assert_eq!(m.bytes(), 4 * P);
    }

    #[test]
    fn hostile_pagemaps_are_errors() {
        let vmas = [(0x10000, 0x10000 + 16 * P)];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "unaligned",
                pagemap(1, &[(0x10001, 1, PE_PRESENT | PE_LAZY)]),
            ),
            (
                "empty run",
                pagemap(1, &[(0x10000, 0, PE_PRESENT | PE_LAZY)]),
            ),
            (
                "out of order",
                pagemap(
                    1,
                    &[
                        (0x10000 + P, 1, PE_PRESENT | PE_LAZY),
                        (0x10000, 1, PE_PRESENT | PE_LAZY),
                    ],
                ),
            ),
            ("wraps", pagemap(1, &[(u64::MAX - P + 1, 2, PE_PRESENT)])),
            ("parent", pagemap(1, &[(0x10000, 1, PE_PARENT | PE_LAZY)])),
            ("page server", pagemap(1, &[(0x10000, 1, PE_LAZY)])),
            (
                "truncated",
                pagemap(1, &[(0x10000, 1, PE_PRESENT)])[..20].to_vec(),
            ),
            ("wrong magic", mm(&[])),
        ];
        for (what, bytes) in cases {
            assert!(
                lazy_ranges(&bytes, &vmas, Bytes::InImages).is_err(),
                "{what} accepted"
            );
        }
        // A lazy dump's runs are served, never read from the images, and
        // the other way round.
        let served = pagemap(1, &[(0x10000, 2, PE_LAZY)]);
        let m = lazy_ranges(&served, &vmas, Bytes::FromPageServer).unwrap();
        assert_eq!(
            (m.ranges[0].start, m.ranges[0].end),
            (0x10000, 0x10000 + 2 * P)
        );
        let in_images = pagemap(1, &[(0x10000, 2, PE_PRESENT | PE_LAZY)]);
        assert!(lazy_ranges(&in_images, &vmas, Bytes::FromPageServer).is_err());
        assert!(lazy_vmas(&mm(&[(0x2000, 0x1000, ANON, 0)])).is_err());
        assert!(lazy_vmas(&mm(&[(0x1000, 0x3000, ANON, 0), (0x2000, 0x4000, ANON, 0)])).is_err());
    }
}
