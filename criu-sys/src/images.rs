//! CRIU's image files, read only as far as a restore's privileges need.
//!
//! A restore gives each process whatever its images say: uids and gids,
//! every capability set, seccomp mode, no_new_privs, LSM label. Images come
//! from another node, or from anyone who can write where they are read
//! from, so a caller must know what CRIU *will* restore before it lets CRIU
//! do it, and must not take the word of any other file for it. This module
//! reads the per-thread core images (`core-TID.img`) defensively: regular
//! files only, never through a symlink, bounded in size, and a malformed
//! image is an error, never a panic.
//!
//! Image layout (CRIU's `magic.h` and `protobuf.c`): a little-endian u32
//! `IMG_COMMON_MAGIC`, the image type's magic, then entries, each a
//! little-endian u32 length followed by that many bytes of protobuf.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use protobuf::Message;

use crate::rpc_images::{
    Core_entry, Inventory_entry, Mnt_entry, Pstree_entry, Task_kobj_ids_entry,
};

/// Magic at the head of every image but the inventory.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// The core image's own magic.
pub const CORE_MAGIC: u32 = 0x5505_3847;
/// The process tree (`pstree.img`).
pub const PSTREE_MAGIC: u32 = 0x5027_3030;
/// The mounts of a mount namespace (`mountpoints-ID.img`).
pub const MNTS_MAGIC: u32 = 0x5556_3928;
/// More mounts than any container has; bounds the work.
pub const MAX_MOUNTS: usize = 10_000;
/// A task's namespace ids (`ids-PID.img`).
pub const IDS_MAGIC: u32 = 0x5443_2030;
/// The inventory's only magic (it has no common magic before it).
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// Small images (ids, inventory) are far below this.
const MAX_SMALL_BYTES: u64 = 64 << 10;
/// A core image is a few KiB; anything far larger is not one.
const MAX_CORE_BYTES: u64 = 1 << 20;
/// More threads than any container we restore has; bounds the work.
pub const MAX_THREADS: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read CRIU image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CRIU image {path} is malformed: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("CRIU images in {dir}: {why}")]
    Directory { dir: PathBuf, why: String },
}

/// A capability set: bit N is capability N (CRIU stores 32-bit words).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// The capabilities in `self` but not in `allowed`.
    pub fn beyond(self, allowed: CapSet) -> CapSet {
        CapSet(self.0 & !allowed.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Capability numbers, lowest first.
    pub fn numbers(self) -> impl Iterator<Item = u32> {
        (0..64).filter(move |n| self.0 & (1u64 << n) != 0)
    }
}

/// A thread's seccomp mode (`SECCOMP_MODE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    Disabled,
    Strict,
    Filter,
    Unknown(u32),
}

impl From<u32> for SeccompMode {
    fn from(v: u32) -> Self {
        match v {
            0 => SeccompMode::Disabled,
            1 => SeccompMode::Strict,
            2 => SeccompMode::Filter,
            n => SeccompMode::Unknown(n),
        }
    }
}

/// A thread's credentials as its core image records them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Creds {
    /// Real, effective, saved and file-system uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and file-system gid.
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub inheritable: CapSet,
    pub permitted: CapSet,
    pub effective: CapSet,
    pub bounding: CapSet,
    /// Absent in images of CRIUs that do not record it.
    pub ambient: Option<CapSet>,
    pub secbits: u32,
    /// CRIU records the flag only when it is set.
    pub no_new_privs: bool,
    /// The LSM label (AppArmor profile or SELinux context), if any.
    pub lsm_profile: Option<String>,
}

/// What CRIU will give one thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadState {
    /// The thread id the image is named after (`core-TID.img`).
    pub tid: u32,
    /// The command name (`comm`), when the image records one.
    pub comm: Option<String>,
    /// None when the image records no credentials (CRIU then keeps the
    /// restorer's, which are root's: callers must treat it as the worst).
    pub creds: Option<Creds>,
    pub seccomp: SeccompMode,
}

/// Every thread's state, from every `core-*.img` in `dir`.
pub fn threads(dir: &Path) -> Result<Vec<ThreadState>, ImageError> {
    let mut out = Vec::new();
    for (tid, path) in numbered(dir, "core-")? {
        let mut t = read_core(&path)?;
        t.tid = tid;
        out.push(t);
    }
    if out.is_empty() {
        return Err(ImageError::Directory {
            dir: dir.to_path_buf(),
            why: "no core images (core-TID.img)".into(),
        });
    }
    Ok(out)
}

/// A kind of Linux namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NsKind {
    Pid,
    Net,
    Ipc,
    Uts,
    Mount,
    User,
    Cgroup,
    Time,
}

impl NsKind {
    pub const ALL: [NsKind; 8] = [
        NsKind::Pid,
        NsKind::Net,
        NsKind::Ipc,
        NsKind::Uts,
        NsKind::Mount,
        NsKind::User,
        NsKind::Cgroup,
        NsKind::Time,
    ];

    fn id(self, ids: &Task_kobj_ids_entry) -> Option<u32> {
        match self {
            NsKind::Pid => ids.pid_ns_id,
            NsKind::Net => ids.net_ns_id,
            NsKind::Ipc => ids.ipc_ns_id,
            NsKind::Uts => ids.uts_ns_id,
            NsKind::Mount => ids.mnt_ns_id,
            NsKind::User => ids.user_ns_id,
            NsKind::Cgroup => ids.cgroup_ns_id,
            NsKind::Time => ids.time_ns_id,
        }
    }
}

impl std::fmt::Display for NsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NsKind::Pid => "PID",
            NsKind::Net => "network",
            NsKind::Ipc => "IPC",
            NsKind::Uts => "UTS",
            NsKind::Mount => "mount",
            NsKind::User => "user",
            NsKind::Cgroup => "cgroup",
            NsKind::Time => "time",
        })
    }
}

/// For each task (`ids-PID.img`), the namespaces it shared with the CRIU
/// that dumped it, i.e. the dumping node's own. CRIU restores a task into
/// the restoring side's namespace for each of these. A namespace id that
/// either side does not record counts as shared: the worst case.
pub fn host_namespaces(dir: &Path) -> Result<Vec<(u32, Vec<NsKind>)>, ImageError> {
    let inventory = dir.join("inventory.img");
    let bytes = read_bounded(&inventory, MAX_SMALL_BYTES)?;
    let bad = |path: &Path, why: String| ImageError::Malformed {
        path: path.to_path_buf(),
        why,
    };
    let entry = first_entry(&bytes, &[INVENTORY_MAGIC]).map_err(|w| bad(&inventory, w))?;
    let inv = Inventory_entry::parse_from_bytes(entry)
        .map_err(|e| bad(&inventory, format!("inventory does not decode: {e}")))?;
    let root = inv.root_ids.clone().unwrap_or_default();
    let mut out = Vec::new();
    for (pid, path) in numbered(dir, "ids-")? {
        let bytes = read_bounded(&path, MAX_SMALL_BYTES)?;
        let entry =
            first_entry(&bytes, &[IMG_COMMON_MAGIC, IDS_MAGIC]).map_err(|w| bad(&path, w))?;
        let ids = Task_kobj_ids_entry::parse_from_bytes(entry)
            .map_err(|e| bad(&path, format!("ids do not decode: {e}")))?;
        let shared = NsKind::ALL
            .into_iter()
            .filter(|k| match (k.id(&ids), k.id(&root)) {
                (Some(task), Some(host)) => task == host,
                _ => true,
            })
            .collect();
        out.push((pid, shared));
    }
    if out.is_empty() {
        return Err(ImageError::Directory {
            dir: dir.to_path_buf(),
            why: "no task ids images (ids-PID.img)".into(),
        });
    }
    Ok(out)
}

/// One process of the dumped tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeProcess {
    pub pid: u32,
    pub ppid: u32,
    pub threads: Vec<u32>,
}

/// The processes of `pstree.img`, in CRIU's order (the root first).
pub fn process_tree(dir: &Path) -> Result<Vec<TreeProcess>, ImageError> {
    let path = dir.join("pstree.img");
    let bytes = read_bounded(&path, MAX_CORE_BYTES * 16)?;
    let bad = |why: String| ImageError::Malformed {
        path: path.clone(),
        why,
    };
    let mut out = Vec::new();
    for entry in entries(&bytes, PSTREE_MAGIC, MAX_THREADS, "pstree").map_err(bad)? {
        let e = Pstree_entry::parse_from_bytes(entry)
            .map_err(|e| bad(format!("pstree entry does not decode: {e}")))?;
        out.push(TreeProcess {
            pid: e.pid.unwrap_or(0),
            ppid: e.ppid.unwrap_or(0),
            threads: e.threads.clone(),
        });
    }
    Ok(out)
}

/// A file system type as CRIU records it (`fstype` of mnt.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Proc,
    Sysfs,
    Devtmpfs,
    Tmpfs,
    Devpts,
    Cgroup,
    Cgroup2,
    Mqueue,
    /// Another kind (binfmt_misc, debugfs, securityfs, tracefs, ...).
    Other(u32),
}

impl From<u32> for FsType {
    fn from(v: u32) -> Self {
        match v {
            1 => FsType::Proc,
            2 => FsType::Sysfs,
            3 => FsType::Devtmpfs,
            5 => FsType::Tmpfs,
            6 => FsType::Devpts,
            12 => FsType::Cgroup,
            14 => FsType::Mqueue,
            23 => FsType::Cgroup2,
            n => FsType::Other(n),
        }
    }
}

/// One mount CRIU would make again at restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub fstype: FsType,
    /// Where, inside the container (`/proc/sys`).
    pub mountpoint: String,
    /// Read-only, as a mount or as a super block.
    pub read_only: bool,
    /// Supplied by the restorer (runc) rather than made by CRIU.
    pub external: bool,
}

/// Every mount of every dumped mount namespace (`mountpoints-*.img`).
pub fn mounts(dir: &Path) -> Result<Vec<Mount>, ImageError> {
    let mut out = Vec::new();
    for (_, path) in numbered(dir, "mountpoints-")? {
        let bytes = read_bounded(&path, MAX_CORE_BYTES * 4)?;
        let bad = |why: String| ImageError::Malformed {
            path: path.clone(),
            why,
        };
        let max = MAX_MOUNTS.saturating_sub(out.len());
        for entry in entries(&bytes, MNTS_MAGIC, max, "mountpoints").map_err(bad)? {
            let m = Mnt_entry::parse_from_bytes(entry)
                .map_err(|e| bad(format!("mount entry does not decode: {e}")))?;
            out.push(Mount {
                fstype: m.fstype.unwrap_or(0).into(),
                mountpoint: m.mountpoint.clone().unwrap_or_default(),
                read_only: m.flags.unwrap_or(0) & 1 != 0 || m.sb_flags.unwrap_or(0) & 1 != 0,
                external: m.ext_mount.unwrap_or(false) || m.ext_key.is_some(),
            });
        }
    }
    Ok(out)
}

/// Every entry of an image whose type magic is `magic` (after the common
/// magic), at most `max` of them.
pub(crate) fn entries<'a>(
    bytes: &'a [u8],
    magic: u32,
    max: usize,
    what: &str,
) -> Result<Vec<&'a [u8]>, String> {
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    head[4..].copy_from_slice(&magic.to_le_bytes());
    let mut rest = bytes
        .get(8..)
        .filter(|_| bytes.get(..8) == Some(&head[..]))
        .ok_or_else(|| format!("wrong magic (not a CRIU {what} image)"))?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if out.len() >= max {
            return Err(format!("more than {max} entries"));
        }
        let len = rest
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("truncated entry")?;
        let entry = rest.get(4..4 + len).ok_or("truncated entry")?;
        out.push(entry);
        rest = &rest[4 + len..];
    }
    Ok(out)
}

/// `PREFIXnnn.img` files in `dir`, by number (bounded in count).
fn numbered(dir: &Path, prefix: &str) -> Result<Vec<(u32, PathBuf)>, ImageError> {
    let io = |source| ImageError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix)?.strip_suffix(".img")?.parse().ok())
        else {
            continue;
        };
        if out.len() >= MAX_THREADS {
            return Err(ImageError::Directory {
                dir: dir.to_path_buf(),
                why: format!("more than {MAX_THREADS} {prefix}*.img images"),
            });
        }
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// One core image.
pub fn read_core(path: &Path) -> Result<ThreadState, ImageError> {
    let bytes = read_bounded(path, MAX_CORE_BYTES)?;
    let bad = |why: String| ImageError::Malformed {
        path: path.to_path_buf(),
        why,
    };
    let entry = first_entry(&bytes, &[IMG_COMMON_MAGIC, CORE_MAGIC]).map_err(bad)?;
    let core = Core_entry::parse_from_bytes(entry)
        .map_err(|e| bad(format!("core entry does not decode: {e}")))?;
    let tc_mode = core.tc.as_ref().and_then(|tc| tc.old_seccomp_mode);
    let thread = core.thread_core.as_ref();
    let seccomp = thread
        .and_then(|t| t.seccomp_mode)
        .or(tc_mode)
        .unwrap_or(0)
        .into();
    let creds = match thread.and_then(|t| t.creds.as_ref()) {
        Some(c) => Some(creds(c).map_err(bad)?),
        None => None,
    };
    Ok(ThreadState {
        tid: 0,
        comm: core.tc.as_ref().and_then(|tc| tc.comm.clone()),
        creds,
        seccomp,
    })
}

fn creds(c: &crate::rpc_images::Creds_entry) -> Result<Creds, String> {
    let id = |v: Option<u32>, what: &str| v.ok_or_else(|| format!("credentials lack {what}"));
    Ok(Creds {
        uids: [
            id(c.uid, "uid")?,
            id(c.euid, "euid")?,
            id(c.suid, "suid")?,
            id(c.fsuid, "fsuid")?,
        ],
        gids: [
            id(c.gid, "gid")?,
            id(c.egid, "egid")?,
            id(c.sgid, "sgid")?,
            id(c.fsgid, "fsgid")?,
        ],
        groups: c.groups.clone(),
        inheritable: caps(&c.cap_inh)?,
        permitted: caps(&c.cap_prm)?,
        effective: caps(&c.cap_eff)?,
        bounding: caps(&c.cap_bnd)?,
        ambient: if c.cap_amb.is_empty() {
            None
        } else {
            Some(caps(&c.cap_amb)?)
        },
        secbits: c.secbits.unwrap_or(0),
        no_new_privs: c.no_new_privs.unwrap_or(0) != 0,
        lsm_profile: c.lsm_profile.clone().filter(|s| !s.is_empty()),
    })
}

/// CRIU's 32-bit words, lowest first, as one set.
fn caps(words: &[u32]) -> Result<CapSet, String> {
    let mut set = 0u64;
    for (i, w) in words.iter().enumerate() {
        match i {
            0 => set |= u64::from(*w),
            1 => set |= u64::from(*w) << 32,
            _ if *w == 0 => {}
            _ => {
                return Err(format!(
                    "capability word {i} is set ({w:#x}): unknown capabilities"
                ))
            }
        }
    }
    Ok(CapSet(set))
}

/// The first entry of an image that starts with `magics`.
fn first_entry<'a>(bytes: &'a [u8], magics: &[u32]) -> Result<&'a [u8], String> {
    let word = |at: usize| -> Option<u32> {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    for (i, magic) in magics.iter().enumerate() {
        if word(4 * i) != Some(*magic) {
            return Err(format!("wrong magic (expected {magic:#x})"));
        }
    }
    let at = 4 * magics.len();
    let len = word(at).ok_or("no entry")? as usize;
    bytes
        .get(at + 4..)
        .and_then(|rest| rest.get(..len))
        .ok_or_else(|| format!("entry of {len} bytes is truncated"))
}

/// A core image holding `creds` and `seccomp` as CRIU writes one: for
/// tests of callers and for fuzzing (CRIU itself writes the real ones).
pub fn encode_core(creds: Option<&Creds>, seccomp: SeccompMode) -> Vec<u8> {
    use crate::rpc_images::{Creds_entry, Thread_core_entry};
    let words = |s: CapSet| vec![s.0 as u32, (s.0 >> 32) as u32];
    let mut t = Thread_core_entry::new();
    t.seccomp_mode = Some(match seccomp {
        SeccompMode::Disabled => 0,
        SeccompMode::Strict => 1,
        SeccompMode::Filter => 2,
        SeccompMode::Unknown(n) => n,
    });
    if let Some(c) = creds {
        let mut e = Creds_entry::new();
        [e.uid, e.euid, e.suid, e.fsuid] = c.uids.map(Some);
        [e.gid, e.egid, e.sgid, e.fsgid] = c.gids.map(Some);
        e.groups = c.groups.clone();
        e.cap_inh = words(c.inheritable);
        e.cap_prm = words(c.permitted);
        e.cap_eff = words(c.effective);
        e.cap_bnd = words(c.bounding);
        e.cap_amb = c.ambient.map(words).unwrap_or_default();
        e.secbits = Some(c.secbits);
        e.no_new_privs = c.no_new_privs.then_some(1);
        e.lsm_profile = c.lsm_profile.clone();
        t.creds = Some(e).into();
    }
    let mut core = Core_entry::new();
    core.mtype = Some(1);
    core.thread_core = Some(t).into();
    let body = core.write_to_bytes().unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend(IMG_COMMON_MAGIC.to_le_bytes());
    out.extend(CORE_MAGIC.to_le_bytes());
    out.extend((body.len() as u32).to_le_bytes());
    out.extend(body);
    out
}

/// A regular file (never through a symlink), at most `max` bytes.
pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(ImageError::Malformed {
            path: path.to_path_buf(),
            why: "not a regular file".into(),
        });
    }
    let mut bytes = Vec::new();
    (&f as &File)
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(ImageError::Malformed {
            path: path.to_path_buf(),
            why: format!("larger than {max} bytes"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(eff: u64) -> Creds {
        Creds {
            effective: CapSet(eff),
            permitted: CapSet(eff),
            bounding: CapSet(eff),
            no_new_privs: true,
            ..Default::default()
        }
    }

    #[test]
    fn credentials_and_seccomp_come_from_core_images() {
        let dir = tempfile::tempdir().unwrap();
        let full = 0x1ff_ffff_ffff;
        let c = root(full);
        std::fs::write(
            dir.path().join("core-7.img"),
            encode_core(Some(&c), SeccompMode::Filter),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("core-9.img"),
            encode_core(None, SeccompMode::Disabled),
        )
        .unwrap();
        std::fs::write(dir.path().join("pages-1.img"), b"not a core").unwrap();
        let t = threads(dir.path()).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].tid, 7);
        assert_eq!(t[0].creds.as_ref(), Some(&c));
        assert_eq!(t[0].seccomp, SeccompMode::Filter);
        assert_eq!((t[1].tid, t[1].creds.as_ref()), (9, None));
        assert_eq!(
            CapSet(0b1011)
                .beyond(CapSet(0b0011))
                .numbers()
                .collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn hostile_images_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("core-1.img");
        let good = encode_core(Some(&root(1)), SeccompMode::Disabled);
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            good[..6].to_vec(),
            good[..good.len() - 3].to_vec(),
            b"\x19\x43\x56\x54\x47\x38\x05\x55\xff\xff\xff\xff".to_vec(),
        ];
        let mut wrong_magic = good.clone();
        wrong_magic[4] ^= 1;
        cases.push(wrong_magic);
        for i in 12..good.len() {
            for v in [0x00, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                cases.push(b);
            }
        }
        for (i, bytes) in cases.iter().enumerate() {
            std::fs::write(&p, bytes).unwrap();
            let result = read_core(&p); // must return, whatever it says
            if i < 5 {
                assert!(result.is_err(), "case {i} accepted");
            }
        }
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        assert!(read_core(&p).is_err(), "followed a symlink");
        assert!(threads(&dir.path().join("none")).is_err());
    }
}
