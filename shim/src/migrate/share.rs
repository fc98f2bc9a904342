//! The share: every name on it and every way in, in one place.
//!
//! The share is a directory every node mounts, and whoever can write to it
//! (any node, an operator, an attacker who got there) can plant symlinks,
//! FIFOs, devices or huge files in it. The shim is root, so nothing on the
//! share is followed or read without bounds:
//! - directories are opened beneath the share's root with openat2
//!   (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, [`crate::beneath`]): a symlink
//!   anywhere on the way, or a `..` that climbs out, is refused;
//! - files are opened relative to their directory with O_NOFOLLOW and must
//!   be regular files; small files (markers) are read with a size bound;
//! - what we create is private: directories 0700, files 0600.
//!
//! Layout: `<share>/<tenant>/<key>/<archive>`, with `<tenant>` one of
//! [`Tenant::dir_name`]. Keys resolve inside their tenant's part, so a pod
//! can neither read nor overwrite another namespace's checkpoints.
//!
//! Publishing is atomic: write under a hidden temporary name, fsync,
//! rename without replacing anything, fsync the directory, then record a
//! sequence marker ([`sequence`](super::sequence)) so readers on
//! eventually consistent file systems find the newest archive by name.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat2, OFlag, RenameFlags};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};

use crate::beneath;
use crate::error::{Error, Result};

/// Archives are named `<key>/<timestamp>.criu.tar.zst` (or `.criu.tar`).
pub const SUFFIXES: [&str; 2] = [".criu.tar.zst", ".criu.tar"];
/// Modes of what the shim creates on the share.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
/// A directory with more entries than this is not ours; refuse to list it.
const MAX_LISTING: usize = 100_000;

/// Whose checkpoints: the Kubernetes namespace of a pod, or (for
/// containers made without the CRI) containerd's own users, who can run
/// privileged containers anyway and so form one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenant {
    Namespace(String),
    Containerd,
}

impl Tenant {
    /// The tenant's directory under the share root.
    pub fn dir_name(&self) -> String {
        match self {
            Tenant::Namespace(ns) => format!("k8s-{ns}"),
            Tenant::Containerd => "containerd".into(),
        }
    }

    /// The name recorded in (signed) manifests.
    pub fn id(&self) -> String {
        match self {
            Tenant::Namespace(ns) => format!("k8s/{ns}"),
            Tenant::Containerd => "containerd".into(),
        }
    }

    /// From a Kubernetes namespace annotation; refuses what Kubernetes
    /// would never name a namespace (DNS label: a-z, 0-9, '-', <= 63).
    pub fn namespace(ns: &str) -> Result<Tenant> {
        let ok = !ns.is_empty()
            && ns.len() <= 63
            && ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if ok {
            Ok(Tenant::Namespace(ns.to_string()))
        } else {
            Err(Error::InvalidArgument(format!(
                "pod namespace {ns:?} is not a Kubernetes namespace name"
            )))
        }
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tenant::Namespace(ns) => write!(f, "namespace {ns}"),
            Tenant::Containerd => f.write_str("containerd (no pod)"),
        }
    }
}

pub fn is_archive_name(name: &str) -> bool {
    SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Checks that `name` is a plain relative path (no `..`, no leading `/`,
/// no hidden components, no NUL, not absurdly long).
pub fn check_name(name: &str) -> Result<&Path> {
    let p = Path::new(name);
    let ok = !name.is_empty()
        && name.len() <= 1024
        && !name.contains('\0')
        && p.components().all(|c| match c {
            Component::Normal(s) => !s.as_bytes().starts_with(b".") && s.len() <= 255,
            _ => false,
        });
    if ok {
        Ok(p)
    } else {
        Err(Error::InvalidArgument(format!(
            "archive name {name:?} must be a relative path inside the share \
             (no '..', no leading '/', no hidden components)"
        )))
    }
}

/// The share reference for one container. Pod annotations reach every
/// container of a pod, so for a container of a pod (`container_name` from
/// the CRI) a key names the pod's checkpoints and each container's archives
/// live under `KEY/<container name>/`; the name is the one in the pod
/// manifest, so the restored pod finds each container's own archive. Exact
/// archive names, and containers outside pods, are used as they are.
pub fn per_container(reference: &str, container_name: Option<&str>) -> String {
    match container_name.filter(|n| !n.is_empty()) {
        Some(name) if !is_archive_name(reference) => {
            format!("{}/{name}", reference.trim_end_matches('/'))
        }
        _ => reference.to_string(),
    }
}

/// What `stat` says of an entry, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Other,
}

#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub kind: Kind,
    pub size: u64,
    pub modified: SystemTime,
}

fn escape_error(path: &Path) -> Error {
    Error::InvalidArgument(format!(
        "{} on the share is, or passes through, a symlink (or leaves the share); \
         refused: remove it",
        path.display()
    ))
}

/// A directory on the share, opened beneath the share's root. Every
/// operation is relative to its descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Where it is, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries (not `.`/`..`) with their kinds, unsorted, bounded.
    pub fn entries(&self) -> Result<Vec<(String, Kind)>> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| Error::io(format!("read {}", self.path.display()), e))?;
        let mut dir = nix::dir::Dir::from_fd(fd)
            .map_err(|e| Error::io(format!("read {}", self.path.display()), e.into()))?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry =
                entry.map_err(|e| Error::io(format!("read {}", self.path.display()), e.into()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            if out.len() >= MAX_LISTING {
                return Err(Error::InvalidArgument(format!(
                    "{} has more than {MAX_LISTING} entries; not a directory criu-shim made",
                    self.path.display()
                )));
            }
            let kind = match entry.file_type() {
                Some(nix::dir::Type::File) => Kind::File,
                Some(nix::dir::Type::Directory) => Kind::Dir,
                Some(_) => Kind::Other,
                None => self.stat(&name).map(|s| s.kind).unwrap_or(Kind::Other),
            };
            out.push((name, kind));
        }
        Ok(out)
    }

    /// `stat` of `name`, never following it; None if it does not exist.
    pub fn stat(&self, name: &str) -> Option<Stat> {
        let st = fstatat(
            self.fd.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .ok()?;
        let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let kind = if fmt == SFlag::S_IFREG {
            Kind::File
        } else if fmt == SFlag::S_IFDIR {
            Kind::Dir
        } else {
            Kind::Other
        };
        let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(st.st_mtime.max(0) as u64);
        Some(Stat {
            kind,
            size: st.st_size.max(0) as u64,
            modified,
        })
    }

    /// Opens the regular file `name` for reading (never a symlink, FIFO or
    /// device: O_NONBLOCK so a FIFO cannot hang the open).
    pub fn open_file(&self, name: &str) -> Result<(File, u64)> {
        let path = self.path.join(name);
        let fd = openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP => escape_error(&path),
            Errno::ENOENT => Error::NotFound(format!("{} not found", path.display())),
            e => Error::io(format!("open {}", path.display()), e.into()),
        })?;
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{} on the share is not a regular file; refused",
                path.display()
            )));
        }
        // Back to blocking reads for the data itself.
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
            .map_err(|e| Error::io(format!("open {}", path.display()), e.into()))?;
        Ok((file, meta.len()))
    }

    /// The whole of a small regular file, at most `max` bytes; None if it
    /// does not exist.
    pub fn read_small(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let (file, _) = match self.open_file(name) {
            Ok(f) => f,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(format!("read {}", self.path.join(name).display()), e))?;
        if buf.len() as u64 > max {
            return Err(Error::InvalidArgument(format!(
                "{} on the share is larger than {max} bytes; refused",
                self.path.join(name).display()
            )));
        }
        Ok(Some(buf))
    }

    /// Creates the new, private file `name` (fails if anything is there).
    pub fn create_new(&self, name: &str) -> Result<File> {
        let fd = openat(
            self.fd.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(FILE_MODE),
        )
        .map_err(|e| match e {
            Errno::EEXIST => {
                Error::AlreadyExists(format!("{} already exists", self.path.join(name).display()))
            }
            e => Error::io(
                format!("create {}", self.path.join(name).display()),
                e.into(),
            ),
        })?;
        Ok(File::from(fd))
    }

    /// rename(2) within this directory that fails instead of replacing an
    /// existing file. File systems without RENAME_NOREPLACE (sshfs and
    /// some other FUSE ones) get link+unlink, which is equally exclusive.
    pub fn rename_noreplace(&self, from: &str, to: &str) -> Result<()> {
        let (fd, target) = (self.fd.as_fd(), self.path.join(to));
        match renameat2(fd, from, fd, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => Err(Error::AlreadyExists(format!(
                "{} appeared while writing; not overwritten",
                target.display()
            ))),
            Err(Errno::EINVAL | Errno::ENOSYS) => {
                linkat(fd, from, fd, to, nix::fcntl::AtFlags::empty()).map_err(|e| match e {
                    Errno::EEXIST => Error::AlreadyExists(format!(
                        "{} exists; not overwritten",
                        target.display()
                    )),
                    e => Error::io(format!("link {}", target.display()), e.into()),
                })?;
                self.remove(from)
                    .map_err(|e| Error::io("remove temporary archive", e))
            }
            Err(e) => Err(Error::io(
                format!("rename to {}", target.display()),
                e.into(),
            )),
        }
    }

    /// Removes the file `name` (not a directory).
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir).map_err(Into::into)
    }

    /// fsync of the directory: a rename in it is durable.
    pub fn sync(&self) -> Result<()> {
        nix::unistd::fsync(&self.fd)
            .map_err(|e| Error::io(format!("fsync {}", self.path.display()), e.into()))
    }

    /// The subdirectory `name` (never a symlink).
    pub fn subdir(&self, name: &str) -> Result<Option<Dir>> {
        self.beneath(Path::new(name), false)
    }

    /// The directory `rel` beneath this one, never through a symlink; None
    /// if it does not exist (or, with `file_is_none`, is not a directory).
    fn beneath(&self, rel: &Path, file_is_none: bool) -> Result<Option<Dir>> {
        let path = self.path.join(rel);
        match beneath::open(&self.fd, rel, libc::O_DIRECTORY | libc::O_RDONLY, 0) {
            Ok(fd) => Ok(Some(Dir { fd, path })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if beneath::is_escape(&e) => Err(escape_error(&path)),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                if file_is_none {
                    Ok(None)
                } else {
                    Err(Error::InvalidArgument(format!(
                        "{} on the share is not a directory",
                        path.display()
                    )))
                }
            }
            Err(e) => Err(Error::io(format!("open {}", path.display()), e)),
        }
    }

    /// The subdirectory `name`, created (0700) if missing.
    fn subdir_created(&self, name: &str) -> Result<Dir> {
        match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(DIR_MODE)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(Error::io_or_full(
                    format!("create {}", self.path.join(name).display()),
                    e.into(),
                    "the share is full; free space and retry",
                ))
            }
        }
        self.subdir(name)?
            .ok_or_else(|| Error::Other(format!("{} vanished", self.path.join(name).display())))
    }

    /// Another handle on the same directory.
    fn dup(&self) -> Result<Dir> {
        Ok(Dir {
            fd: self
                .fd
                .try_clone()
                .map_err(|e| Error::io(format!("open {}", self.path.display()), e))?,
            path: self.path.clone(),
        })
    }
}

/// The share (or one tenant's part of it).
#[derive(Debug)]
pub struct Share {
    root: Dir,
}

/// An archive found on the share.
#[derive(Debug)]
pub struct Archive {
    pub dir: Dir,
    pub name: String,
}

impl Archive {
    pub fn path(&self) -> PathBuf {
        self.dir.path.join(&self.name)
    }

    pub fn open(&self) -> Result<(File, u64)> {
        self.dir.open_file(&self.name)
    }
}

#[derive(Debug)]
pub struct Published {
    pub path: PathBuf,
    /// The archive's name relative to the share part it was published in.
    pub name: String,
    pub size: u64,
}

impl Share {
    /// The share mounted at `path`.
    pub fn open(path: &Path) -> Result<Share> {
        let fd = beneath::open_root(path).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::FailedPrecondition(format!(
                "share directory {} is a symlink; point CRIU_SHIM_SHARE_DIR at the mount itself",
                path.display()
            )),
            _ => Error::FailedPrecondition(format!(
                "share directory {} does not exist: mount the shared file system there \
                 or set CRIU_SHIM_SHARE_DIR ({e})",
                path.display()
            )),
        })?;
        Ok(Share {
            root: Dir {
                fd,
                path: path.to_path_buf(),
            },
        })
    }

    /// `tenant`'s part of the share; created when `create`, else None
    /// when it does not exist yet.
    pub fn tenant(&self, tenant: &Tenant, create: bool) -> Result<Option<Share>> {
        let name = tenant.dir_name();
        let dir = if create {
            Some(self.root.subdir_created(&name)?)
        } else {
            self.root.subdir(&name)?
        };
        Ok(dir.map(|root| Share { root }))
    }

    /// A directory of the share as a share of its own (names resolve
    /// beneath it).
    pub fn from_dir(root: Dir) -> Share {
        Share { root }
    }

    /// The directory `rel` (a checked name) beneath the root.
    pub fn dir(&self, rel: &str) -> Result<Option<Dir>> {
        self.root.beneath(check_name(rel)?, true)
    }

    /// The directory `rel` beneath the root, each missing component
    /// created 0700 (never through a symlink).
    pub fn create_dir(&self, rel: &str) -> Result<Dir> {
        let p = check_name(rel)?;
        let mut dir = self.root.dup()?;
        for c in p.components() {
            let name = c.as_os_str().to_string_lossy().into_owned();
            dir = dir.subdir_created(&name)?;
        }
        Ok(dir)
    }

    /// Subdirectories (keys, and pods' `KEY/<container>`) that hold
    /// archives, as names relative to the root, sorted. Depth-bounded.
    pub fn keys(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.walk_keys(&self.root, "", 0, &mut out)?;
        out.sort();
        Ok(out)
    }

    fn walk_keys(&self, dir: &Dir, rel: &str, depth: usize, out: &mut Vec<String>) -> Result<()> {
        if depth > 8 {
            return Ok(());
        }
        let mut has_archives = false;
        for (name, kind) in dir.entries()? {
            if name.starts_with('.') {
                continue;
            }
            match kind {
                Kind::File if is_archive_name(&name) => has_archives = true,
                Kind::Dir => {
                    if let Some(sub) = dir.subdir(&name)? {
                        let sub_rel = if rel.is_empty() {
                            name.clone()
                        } else {
                            format!("{rel}/{name}")
                        };
                        self.walk_keys(&sub, &sub_rel, depth + 1, out)?;
                    }
                }
                _ => {}
            }
        }
        if has_archives && !rel.is_empty() {
            out.push(rel.to_string());
        }
        Ok(())
    }

    /// The archive `reference` denotes: an exact archive name, or a key
    /// (its newest complete archive).
    pub fn resolve(&self, reference: &str) -> Result<Archive> {
        check_name(reference)?;
        let not_found = || {
            Error::NotFound(format!(
                "no archive under {reference}/ on the share {} (is the checkpoint published, \
                 in this pod's namespace, and the share mounted on this node?)",
                self.root.path.display()
            ))
        };
        if is_archive_name(reference) {
            let (dir_rel, name) = split_last(reference);
            let dir = match dir_rel {
                Some(d) => self.dir(d)?,
                None => Some(self.root.dup()?),
            };
            let archive = dir.and_then(|dir| {
                (dir.stat(name).map(|s| s.kind) == Some(Kind::File)).then(|| Archive {
                    dir,
                    name: name.to_string(),
                })
            });
            return archive.ok_or_else(|| {
                Error::NotFound(format!(
                    "archive {reference} not found on the share {}",
                    self.root.path.display()
                ))
            });
        }
        let dir = self.dir(reference)?.ok_or_else(not_found)?;
        // The listing may be stale on a network file system; markers are
        // looked up by name, so they win. Archives published without
        // markers are still found by listing.
        let name = match super::sequence::newest(&dir)? {
            Some(name) => Some(name),
            None => list(&dir)?.pop(),
        };
        let name = name.ok_or_else(not_found)?;
        Ok(Archive { dir, name })
    }

    /// [`Share::resolve`], retried for up to `wait` while nothing is found:
    /// another node's archive can take a while to show up on a network
    /// file system.
    pub fn resolve_waiting(&self, reference: &str, wait: Duration) -> Result<Archive> {
        let deadline = Instant::now() + wait;
        loop {
            match self.resolve(reference) {
                Err(Error::NotFound(msg)) if Instant::now() < deadline => {
                    log::debug!("{msg}; waiting for it to appear");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(Error::NotFound(msg)) if !wait.is_zero() => {
                    return Err(Error::NotFound(format!(
                        "{msg}; waited {} s (CRIU_SHIM_FETCH_WAIT)",
                        wait.as_secs()
                    )))
                }
                other => return other,
            }
        }
    }

    /// Writes an archive named `name` with `write`, atomically. With
    /// `unique` (a name we made up from the time), a name another publisher
    /// took meanwhile is not an error: the archive gets the next free
    /// `<time>_N` name instead, without being written again.
    pub fn publish(
        &self,
        name: &str,
        unique: bool,
        write: impl FnOnce(&mut File) -> Result<()>,
    ) -> Result<Published> {
        check_name(name)?;
        let (dir_rel, file_name) = split_last(name);
        let dir = match dir_rel {
            Some(d) => self.create_dir(d)?,
            None => self.root.dup()?,
        };
        if !unique && dir.stat(file_name).is_some() {
            return Err(Error::AlreadyExists(format!(
                "archive {} already exists; it is never overwritten: pick another name or remove it",
                dir.path.join(file_name).display()
            )));
        }
        // Unique per process and per publish: one shim may publish several
        // archives at once (a pod), to one key.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = format!(".{file_name}.partial-{}-{n}", std::process::id());
        let result = write_then_rename(&dir, &tmp, file_name, unique, write);
        if result.is_err() {
            let _ = dir.remove(&tmp);
        }
        let (size, file_name) = result?;
        // The archive is whole and in place; now readers may be pointed at it.
        if let Err(e) = super::sequence::record(&dir, &file_name) {
            log::warn!(
                "published {} but could not record it as the newest of its key ({e}); \
                 restores by key fall back to listing the directory",
                dir.path.join(&file_name).display()
            );
        }
        Ok(Published {
            path: dir.path.join(&file_name),
            name: match dir_rel {
                Some(d) => format!("{d}/{file_name}"),
                None => file_name,
            },
            size,
        })
    }

    /// Takes a published archive back (a pod checkpoint that failed
    /// half-way): the archive and its sequence marker.
    pub fn unpublish(&self, name: &str) {
        let (dir_rel, file_name) = split_last(name);
        let dir = match dir_rel {
            Some(d) => self.dir(d),
            None => self.root.dup().map(Some),
        };
        let Ok(Some(dir)) = dir else {
            return;
        };
        if let Err(e) = dir.remove(file_name) {
            log::warn!("remove {}: {e}", dir.path.join(file_name).display());
        }
        super::sequence::forget(&dir, file_name);
    }
}

/// A publisher's temporary file (archive or marker) on the share: left
/// behind only by a publisher that died mid-write.
pub fn is_leftover(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".partial-") || name.starts_with(".seq-new-"))
}

/// `a/b/c` -> (Some("a/b"), "c"); `c` -> (None, "c").
fn split_last(name: &str) -> (Option<&str>, &str) {
    match name.rsplit_once('/') {
        Some((dir, file)) => (Some(dir), file),
        None => (None, name),
    }
}

/// Complete archives directly in `dir`, oldest (by name) first.
pub fn list(dir: &Dir) -> Result<Vec<String>> {
    let mut out: Vec<String> = dir
        .entries()?
        .into_iter()
        .filter(|(n, k)| *k == Kind::File && !n.starts_with('.') && is_archive_name(n))
        .map(|(n, _)| n)
        .collect();
    out.sort();
    Ok(out)
}

fn write_then_rename(
    dir: &Dir,
    tmp: &str,
    target: &str,
    unique: bool,
    write: impl FnOnce(&mut File) -> Result<()>,
) -> Result<(u64, String)> {
    let mut file = dir.create_new(tmp)?;
    write(&mut file)?;
    file.sync_all()
        .map_err(|e| full_or(e, format!("fsync {}", dir.path.join(tmp).display())))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    drop(file);
    let mut name = target.to_string();
    for n in 1..=MAX_RENAME_TRIES {
        match dir.rename_noreplace(tmp, &name) {
            Err(Error::AlreadyExists(_)) if unique && n < MAX_RENAME_TRIES => {
                name = numbered_name(target, n);
            }
            other => {
                other?;
                break;
            }
        }
    }
    dir.sync()?;
    Ok((size, name))
}

/// How many names a unique publish tries before it gives up.
const MAX_RENAME_TRIES: u32 = 100;

/// `T.criu.tar.zst` -> `T_N.criu.tar.zst` ('_' sorts after '.', so the
/// name still sorts after the one it collided with).
fn numbered_name(name: &str, n: u32) -> String {
    match SUFFIXES.iter().find(|s| name.ends_with(*s)) {
        Some(suffix) => format!("{}_{n}{suffix}", &name[..name.len() - suffix.len()]),
        None => format!("{name}_{n}"),
    }
}

fn full_or(e: std::io::Error, what: String) -> Error {
    Error::io_or_full(what, e, "the share is full; free space and retry")
}

/// A new archive name under `key`: `<key>/<UTC time>.criu.tar.zst`.
pub fn new_name(key: &str, compressed: bool) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = super::config_dump::civil_from_days(days as i64);
    format!(
        "{key}/{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z{}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_millis(),
        if compressed { SUFFIXES[0] } else { SUFFIXES[1] }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn share() -> (tempfile::TempDir, Share) {
        let dir = tempfile::tempdir().unwrap();
        let s = Share::open(dir.path()).unwrap();
        (dir, s)
    }

    fn write(text: &'static [u8]) -> impl FnOnce(&mut File) -> Result<()> {
        move |w| w.write_all(text).map_err(|e| Error::io("w", e))
    }

    #[test]
    fn publishes_atomically_privately_and_never_overwrites() {
        let (dir, s) = share();
        let p = s.publish("job/a.criu.tar", false, write(b"hello")).unwrap();
        assert_eq!(std::fs::read(&p.path).unwrap(), b"hello");
        assert_eq!(p.size, 5);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p.path), 0o600);
        assert_eq!(mode(&dir.path().join("job")), 0o700);
        let err = s.publish("job/a.criu.tar", false, |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        assert_eq!(std::fs::read(&p.path).unwrap(), b"hello");
        for m in std::fs::read_dir(dir.path().join("job")).unwrap().flatten() {
            assert_eq!(mode(&m.path()), 0o600, "{}", m.path().display());
        }
    }

    #[test]
    fn a_taken_generated_name_gets_the_next_free_one() {
        let (dir, s) = share();
        let first = s.publish("job/T.criu.tar.zst", true, write(b"1")).unwrap();
        let second = s.publish("job/T.criu.tar.zst", true, write(b"2")).unwrap();
        assert_eq!(first.name, "job/T.criu.tar.zst");
        assert_eq!(second.name, "job/T_1.criu.tar.zst");
        assert_eq!(std::fs::read(&second.path).unwrap(), b"2");
        // The later one is the key's newest.
        assert_eq!(s.resolve("job").unwrap().name, "T_1.criu.tar.zst");
        let hidden = std::fs::read_dir(dir.path().join("job"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .count();
        assert_eq!(hidden, 0);
        assert_eq!(numbered_name("a.criu.tar", 3), "a_3.criu.tar");
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let (dir, s) = share();
        let err = s
            .publish("job/b.criu.tar", false, |w| {
                w.write_all(b"half").unwrap();
                Err(Error::Other("CRIU died".into()))
            })
            .unwrap_err();
        assert!(err.to_string().contains("CRIU died"));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("job")).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn a_key_means_the_newest_complete_archive() {
        let (dir, s) = share();
        let job = dir.path().join("job");
        std::fs::create_dir_all(&job).unwrap();
        for n in [
            "20260101T000000.000Z.criu.tar.zst",
            "20260102T000000.000Z.criu.tar.zst",
            ".20260103T000000.000Z.criu.tar.zst.partial-7",
            "notes.txt",
        ] {
            std::fs::write(job.join(n), b"x").unwrap();
        }
        let a = s.resolve("job").unwrap();
        assert_eq!(a.path(), job.join("20260102T000000.000Z.criu.tar.zst"));
        let err = s.resolve("other").unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        let err = s.resolve("job/missing.criu.tar.zst").unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        assert!(s.resolve("../etc").is_err());
        assert_eq!(s.keys().unwrap(), vec!["job".to_string()]);
    }

    #[test]
    fn symlinks_on_the_share_are_refused_for_reading_and_writing() {
        let (dir, s) = share();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("x")).unwrap();
        std::fs::write(
            outside.path().join("x/20260101T000000.000Z.criu.tar.zst"),
            b"x",
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("etcl")).unwrap();
        let err = s
            .publish("etcl/x/a.criu.tar", false, write(b"x"))
            .unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        let err = s.resolve("etcl/x").unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        // A symlinked archive inside a real key.
        std::fs::create_dir(dir.path().join("job")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("x/20260101T000000.000Z.criu.tar.zst"),
            dir.path().join("job/20260101T000000.000Z.criu.tar.zst"),
        )
        .unwrap();
        let err = s
            .resolve("job/20260101T000000.000Z.criu.tar.zst")
            .unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        assert!(s.resolve("job").is_err());
        assert_eq!(
            std::fs::read_dir(outside.path().join("x")).unwrap().count(),
            1,
            "something was written outside the share"
        );
    }

    #[test]
    fn tenants_have_their_own_part() {
        let (dir, s) = share();
        let a = s
            .tenant(&Tenant::namespace("team-a").unwrap(), true)
            .unwrap()
            .unwrap();
        a.publish("job/x.criu.tar", false, write(b"a")).unwrap();
        assert!(dir.path().join("k8s-team-a/job/x.criu.tar").is_file());
        let b = s
            .tenant(&Tenant::namespace("team-b").unwrap(), true)
            .unwrap()
            .unwrap();
        assert!(matches!(b.resolve("job"), Err(Error::NotFound(_))));
        assert!(b.resolve("../k8s-team-a/job").is_err());
        for bad in ["", "Team", "a/b", "..", "-x", &"x".repeat(64)] {
            assert!(Tenant::namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_share_and_bad_names_are_explained() {
        let err = Share::open(Path::new("/nonexistent/share")).unwrap_err();
        assert!(err.to_string().contains("CRIU_SHIM_SHARE_DIR"), "{err}");
        for bad in ["../x", "/etc/x", "a/../../x", ".hidden", "", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_name("job/20260101T000000.000Z.criu.tar.zst").is_ok());
    }

    #[test]
    fn names_sort_by_time() {
        use super::super::config_dump::civil_from_days;
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        let n = new_name("job", true);
        assert!(
            n.starts_with("job/20") && n.ends_with(".criu.tar.zst"),
            "{n}"
        );
    }

    #[test]
    fn a_pod_key_names_one_directory_per_container() {
        assert_eq!(per_container("job", Some("web")), "job/web");
        assert_eq!(per_container("job/", Some("web")), "job/web");
        assert_eq!(per_container("job", None), "job");
        assert_eq!(per_container("job", Some("")), "job");
        let exact = "job/web/20260101T000000.000Z.criu.tar.zst";
        assert_eq!(per_container(exact, Some("web")), exact);
    }
}
