//! A restore is a privilege boundary: the restored processes must never get
//! more than the spec of the container they land in allows.
//!
//! CRIU restores each process with the credentials its images record:
//! uids and gids, every capability set, no_new_privs, seccomp, LSM label,
//! and, for each namespace the process shared with the node that dumped
//! it, the restoring node's namespace. runc does not re-apply the target
//! spec's process settings on restore. Images can come from anyone who can
//! write where they are read from (a pod that wrote fake images into its
//! own writable layer, an archive built by hand), and `spec.dump` in an
//! archive is written by the same hand. So the decision is taken from the
//! images CRIU will read ([`criu_sys::images`]), compared with the target
//! spec that containerd wrote for this container, before CRIU runs.
//!
//! What is compared, per thread:
//! - every capability set (bounding, permitted, effective, inheritable,
//!   ambient) must be a subset of the target's;
//! - uids, gids and supplementary groups must be the target's, unless the
//!   target itself may change them (CAP_SETUID / CAP_SETGID permitted);
//! - the target's no_new_privs, seccomp (a filter must be in force; its
//!   program is not compared, see SECURITY.md) and LSM label must hold;
//! - no namespace the target spec gives the container may be one the
//!   process shared with its dumping node (host PID, network, ...);
//! - device nodes CRIU would recreate in the container's tmpfs mounts
//!   (`/dev` of a privileged container holds the host's disks) must be
//!   ones the target spec creates (its `linux.devices`, or runc's
//!   defaults);
//! - the mounts CRIU would make again must not be more open than the
//!   spec's: sysfs and cgroup read-only where the spec says so, the
//!   spec's masked and read-only paths (`/proc/sys`, `/proc/kcore`, ...)
//!   in place, no kernel file systems (debugfs, securityfs, ...) the spec
//!   does not mount.
//!
//! Same or weaker privileges pass; anything more is refused with the
//! difference named.

use std::fmt::Write as _;
use std::path::Path;

use criu_sys::images::{self, CapSet, Creds, FsType, Mount, NsKind, SeccompMode, ThreadState};
use oci_spec::runtime::{Capabilities, LinuxDeviceType, LinuxNamespaceType, Spec};

use crate::error::{Error, Result};

/// Capability names by number (linux/capability.h).
const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];
/// Devices runc creates in every container's /dev (type, major, minor):
/// null, zero, full, random, urandom, tty, console, ptmx.
const RUNC_DEVICES: [(char, i64, i64); 8] = [
    ('c', 1, 3),
    ('c', 1, 5),
    ('c', 1, 7),
    ('c', 1, 8),
    ('c', 1, 9),
    ('c', 5, 0),
    ('c', 5, 1),
    ('c', 5, 2),
];
/// Bounds on reading the tmpfs contents CRIU saved (gzip'd tar).
const MAX_TMPFS_ENTRIES: usize = 100_000;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

/// What the target container's spec allows its processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    pub bounding: CapSet,
    pub permitted: CapSet,
    pub effective: CapSet,
    pub inheritable: CapSet,
    pub ambient: CapSet,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub no_new_privs: bool,
    pub seccomp: bool,
    /// AppArmor profile or SELinux label the spec asks for.
    pub lsm_label: Option<String>,
    /// Namespaces the container gets of its own (or joins by path).
    pub namespaces: Vec<NsKind>,
    /// Device nodes the container's /dev may hold: (type, major, minor).
    pub devices: Vec<(char, i64, i64)>,
    /// File system types the spec mounts (`proc`, `sysfs`, ...), and
    /// those it mounts read-only.
    pub fs_types: Vec<String>,
    pub read_only_fs: Vec<String>,
    /// `linux.readonlyPaths` and `linux.maskedPaths`.
    pub readonly_paths: Vec<String>,
    pub masked_paths: Vec<String>,
}

impl Allowed {
    /// From the target bundle's `config.json`.
    pub fn from_bundle(bundle: &Path) -> Result<Allowed> {
        let path = bundle.join("config.json");
        let spec = Spec::load(&path).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot read the container spec {}: {e}",
                path.display()
            ))
        })?;
        Self::from_spec(&spec)
    }

    pub fn from_spec(spec: &Spec) -> Result<Allowed> {
        let mut a = Allowed::default();
        if let Some(p) = spec.process() {
            a.uid = p.user().uid();
            a.gid = p.user().gid();
            a.groups = p.user().additional_gids().clone().unwrap_or_default();
            a.no_new_privs = p.no_new_privileges().unwrap_or(false);
            a.lsm_label = p
                .apparmor_profile()
                .clone()
                .or_else(|| p.selinux_label().clone())
                .filter(|s| !s.is_empty());
            if let Some(c) = p.capabilities() {
                a.bounding = cap_set(c.bounding())?;
                a.permitted = cap_set(c.permitted())?;
                a.effective = cap_set(c.effective())?;
                a.inheritable = cap_set(c.inheritable())?;
                a.ambient = cap_set(c.ambient())?;
            }
        }
        a.devices = RUNC_DEVICES.to_vec();
        for m in spec.mounts().iter().flatten() {
            let Some(typ) = m.typ().clone() else {
                continue;
            };
            if m.options().iter().flatten().any(|o| o == "ro") {
                a.read_only_fs.push(typ.clone());
            }
            a.fs_types.push(typ);
        }
        if let Some(linux) = spec.linux() {
            a.readonly_paths = linux.readonly_paths().clone().unwrap_or_default();
            a.masked_paths = linux.masked_paths().clone().unwrap_or_default();
            a.seccomp = linux.seccomp().is_some();
            for d in linux.devices().iter().flatten() {
                let kind = match d.typ() {
                    LinuxDeviceType::B => 'b',
                    LinuxDeviceType::C | LinuxDeviceType::U => 'c',
                    _ => continue,
                };
                a.devices.push((kind, d.major(), d.minor()));
            }
            a.namespaces = linux
                .namespaces()
                .iter()
                .flatten()
                .map(|n| ns_kind(n.typ()))
                .collect();
        }
        Ok(a)
    }
}

fn ns_kind(t: LinuxNamespaceType) -> NsKind {
    match t {
        LinuxNamespaceType::Mount => NsKind::Mount,
        LinuxNamespaceType::Cgroup => NsKind::Cgroup,
        LinuxNamespaceType::Uts => NsKind::Uts,
        LinuxNamespaceType::Ipc => NsKind::Ipc,
        LinuxNamespaceType::User => NsKind::User,
        LinuxNamespaceType::Pid => NsKind::Pid,
        LinuxNamespaceType::Network => NsKind::Net,
        LinuxNamespaceType::Time => NsKind::Time,
    }
}

fn cap_set(caps: &Option<Capabilities>) -> Result<CapSet> {
    let mut set = 0u64;
    for c in caps.iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let n = CAP_NAMES.iter().position(|k| *k == name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the container spec names an unknown capability {name:?}"
            ))
        })?;
        set |= 1 << n;
    }
    Ok(CapSet(set))
}

/// `CAP_CHOWN, CAP_KILL` for a set.
pub fn names(set: CapSet) -> String {
    let v: Vec<String> = set
        .numbers()
        .map(|n| {
            CAP_NAMES
                .get(n as usize)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("capability {n}"))
        })
        .collect();
    v.join(", ")
}

/// Checks the images in `images_dir` against `allowed`; the error names
/// every difference found in the first offending thread.
pub fn check(images_dir: &Path, allowed: &Allowed) -> Result<()> {
    let refuse = |why: String| {
        Error::FailedPrecondition(format!(
            "restore refused: {why}. A restore never gives a process more than the \
             container's spec allows: restore into a container whose spec grants it, \
             or checkpoint a container with the same privileges"
        ))
    };
    let unreadable = |e: images::ImageError| {
        Error::InvalidArgument(format!("restore refused: {e}; the checkpoint is unusable"))
    };
    let threads = images::threads(images_dir).map_err(unreadable)?;
    for t in &threads {
        let why = thread_excess(t, allowed);
        if !why.is_empty() {
            return Err(refuse(format!(
                "the archived process (thread {}) {}",
                t.tid,
                why.join("; ")
            )));
        }
    }
    let nodes = device_nodes(images_dir)?;
    let extra: Vec<String> = nodes
        .iter()
        .filter(|(kind, major, minor, _)| !allowed.devices.contains(&(*kind, *major, *minor)))
        .map(|(kind, major, minor, path)| format!("{kind} {major}:{minor} ({path})"))
        .collect();
    if !extra.is_empty() {
        let shown: Vec<&str> = extra.iter().take(8).map(String::as_str).collect();
        return Err(refuse(format!(
            "the archive would recreate {} device node(s) the container spec does not \
             create: {}{}",
            extra.len(),
            shown.join(", "),
            if extra.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )));
    }
    let mounts = images::mounts(images_dir).map_err(unreadable)?;
    let why = mount_excess(&mounts, allowed);
    if !why.is_empty() {
        return Err(refuse(format!(
            "the archive's mounts are more open than the container spec's: {}",
            why.join("; ")
        )));
    }
    for (pid, shared) in images::host_namespaces(images_dir).map_err(unreadable)? {
        let host: Vec<String> = allowed
            .namespaces
            .iter()
            .filter(|k| shared.contains(k))
            .map(|k| k.to_string())
            .collect();
        if !host.is_empty() {
            return Err(refuse(format!(
                "the archived process {pid} ran in its node's own {} namespace(s), \
                 and CRIU would restore it into this node's; the container's spec gives it \
                 its own",
                host.join(", ")
            )));
        }
    }
    Ok(())
}

/// CRIU's name of a file system type, as OCI specs name it.
fn fs_name(t: FsType) -> Option<&'static str> {
    Some(match t {
        FsType::Proc => "proc",
        FsType::Sysfs => "sysfs",
        FsType::Devtmpfs => "devtmpfs",
        FsType::Cgroup => "cgroup",
        FsType::Cgroup2 => "cgroup2",
        FsType::Other(4) => "binfmt_misc",
        FsType::Other(8) => "pstore",
        FsType::Other(9) => "securityfs",
        FsType::Other(10) => "fusectl",
        FsType::Other(11) => "debugfs",
        FsType::Other(19) => "tracefs",
        _ => return None,
    })
}

/// How the mounts CRIU would make are more open than the spec's, in words.
fn mount_excess(mounts: &[Mount], allowed: &Allowed) -> Vec<String> {
    let mut why = Vec::new();
    // External mounts (binds, masks) are runc's, from the new spec.
    for m in mounts.iter().filter(|m| !m.external) {
        let Some(name) = fs_name(m.fstype) else {
            continue;
        };
        let kernel_fs = !matches!(
            m.fstype,
            FsType::Proc | FsType::Sysfs | FsType::Cgroup | FsType::Cgroup2
        );
        if kernel_fs && !allowed.fs_types.iter().any(|t| t == name) {
            why.push(format!(
                "{name} at {} (the spec mounts no {name})",
                m.mountpoint
            ));
        } else if !m.read_only
            && allowed.read_only_fs.iter().any(|t| t == name)
            && m.fstype != FsType::Proc
        {
            why.push(format!(
                "{name} at {} read-write (the spec mounts {name} read-only)",
                m.mountpoint
            ));
        }
    }
    let at = |p: &str| mounts.iter().find(|m| m.mountpoint == p);
    for p in &allowed.readonly_paths {
        if matches!(at(p), Some(m) if !m.read_only) {
            why.push(format!("{p} read-write (the spec makes it read-only)"));
        }
    }
    // A path of the spec's may not exist on the dumping node (no mount
    // for it then), but a /proc with none of them guarded is a
    // privileged container's.
    let guarded: Vec<&String> = allowed
        .readonly_paths
        .iter()
        .chain(&allowed.masked_paths)
        .collect();
    let has_proc = mounts.iter().any(|m| m.fstype == FsType::Proc);
    if has_proc && !guarded.is_empty() && !guarded.iter().any(|p| at(p).is_some()) {
        why.push(format!(
            "none of the {} masked and read-only paths the spec asks for (such as {}) is guarded",
            guarded.len(),
            guarded[0]
        ));
    }
    why
}

/// Device nodes in the tmpfs contents CRIU saved (`tmpfs-dev-*.tar.gz.img`,
/// a gzip'd tar per tmpfs mount): (type, major, minor, path).
fn device_nodes(images_dir: &Path) -> Result<Vec<(char, i64, i64, String)>> {
    let unusable = |what: &Path, why: String| {
        Error::InvalidArgument(format!(
            "restore refused: {} is unreadable ({why}); the checkpoint is unusable",
            what.display()
        ))
    };
    let mut out = Vec::new();
    let entries = std::fs::read_dir(images_dir).map_err(|e| unusable(images_dir, e.to_string()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("tmpfs-dev-") && name.ends_with(".tar.gz.img")) {
            continue;
        }
        let path = entry.path();
        let file = open_image(&path).map_err(|e| unusable(&path, e.to_string()))?;
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let mut count = 0;
        // Raw entries: long names and PAX headers are skipped, not read
        // into memory (their size is the archive's word).
        let raw = ar
            .entries()
            .map_err(|e| unusable(&path, e.to_string()))?
            .raw(true);
        for e in raw {
            let e = e.map_err(|e| unusable(&path, e.to_string()))?;
            count += 1;
            if count > MAX_TMPFS_ENTRIES {
                return Err(unusable(&path, "too many entries".into()));
            }
            let h = e.header();
            let kind = match h.entry_type() {
                tar::EntryType::Char => 'c',
                tar::EntryType::Block => 'b',
                _ => continue,
            };
            let major = h.device_major().ok().flatten().unwrap_or(u32::MAX);
            let minor = h.device_minor().ok().flatten().unwrap_or(u32::MAX);
            let p = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            out.push((kind, i64::from(major), i64::from(minor), p));
        }
    }
    Ok(out)
}

/// An image file, never through a symlink.
fn open_image(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(f)
}

/// What `t` would have beyond `allowed`, in words; empty when nothing.
fn thread_excess(t: &ThreadState, allowed: &Allowed) -> Vec<String> {
    let Some(c) = &t.creds else {
        return vec!["records no credentials (CRIU would keep root's)".into()];
    };
    let mut why = Vec::new();
    let sets = [
        ("bounding", c.bounding, allowed.bounding),
        ("permitted", c.permitted, allowed.permitted),
        ("effective", c.effective, allowed.effective),
        ("inheritable", c.inheritable, allowed.inheritable),
        ("ambient", c.ambient.unwrap_or_default(), allowed.ambient),
    ];
    for (set, has, may) in sets {
        let extra = has.beyond(may);
        if !extra.is_empty() {
            why.push(format!(
                "has {} in its {set} set, the container spec does not",
                names(extra)
            ));
        }
    }
    why.extend(id_excess(c, allowed));
    if allowed.no_new_privs && !c.no_new_privs {
        why.push("runs without no_new_privs, the container spec sets it".into());
    }
    if allowed.seccomp && !matches!(t.seccomp, SeccompMode::Filter | SeccompMode::Strict) {
        why.push("runs without seccomp, the container spec has a seccomp profile".into());
    }
    if let Some(label) = &allowed.lsm_label {
        if !lsm_matches(c.lsm_profile.as_deref(), label) {
            why.push(format!(
                "runs with LSM label {:?}, the container spec asks for {label:?}",
                c.lsm_profile.as_deref().unwrap_or("none")
            ));
        }
    }
    why
}

fn id_excess(c: &Creds, allowed: &Allowed) -> Vec<String> {
    let mut why = Vec::new();
    let may_setuid = allowed.permitted.0 & (1 << CAP_SETUID) != 0;
    let may_setgid = allowed.permitted.0 & (1 << CAP_SETGID) != 0;
    if !may_setuid && c.uids.iter().any(|u| *u != allowed.uid) {
        let mut s = String::new();
        let _ = write!(
            s,
            "runs as uid {:?}, the container spec says {}",
            c.uids, allowed.uid
        );
        why.push(s);
    }
    if !may_setgid {
        if c.gids.iter().any(|g| *g != allowed.gid) {
            why.push(format!(
                "runs as gid {:?}, the container spec says {}",
                c.gids, allowed.gid
            ));
        }
        let extra: Vec<u32> = c
            .groups
            .iter()
            .copied()
            .filter(|g| *g != allowed.gid && !allowed.groups.contains(g))
            .collect();
        if !extra.is_empty() {
            why.push(format!(
                "is in groups {extra:?}, the container spec does not list them"
            ));
        }
    }
    why
}

/// AppArmor reports `profile (enforce)`; SELinux a full context.
fn lsm_matches(has: Option<&str>, want: &str) -> bool {
    match has {
        Some(h) => h == want || h.split(" (").next() == Some(want),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use criu_sys::images::encode_core;

    /// runc's default capabilities (containerd's default spec).
    const DEFAULT_CAPS: u64 = 0xa80425fb;
    const ALL_CAPS: u64 = 0x1ff_ffff_ffff;

    fn allowed() -> Allowed {
        let caps = CapSet(DEFAULT_CAPS);
        Allowed {
            bounding: caps,
            permitted: caps,
            effective: caps,
            seccomp: true,
            no_new_privs: false,
            namespaces: vec![NsKind::Pid, NsKind::Mount, NsKind::Net],
            ..Default::default()
        }
    }

    fn creds(caps: u64) -> Creds {
        Creds {
            bounding: CapSet(caps),
            permitted: CapSet(caps),
            effective: CapSet(caps),
            ..Default::default()
        }
    }

    fn images(dir: &Path, c: Option<&Creds>, seccomp: SeccompMode) {
        std::fs::write(dir.join("core-1.img"), encode_core(c, seccomp)).unwrap();
    }

    #[test]
    fn the_same_or_fewer_privileges_pass() {
        let a = allowed();
        for caps in [DEFAULT_CAPS, 0, 1 << 10] {
            let t = ThreadState {
                tid: 1,
                comm: None,
                creds: Some(creds(caps)),
                seccomp: SeccompMode::Filter,
            };
            assert!(thread_excess(&t, &a).is_empty(), "{caps:#x}");
        }
    }

    #[test]
    fn a_privileged_process_is_refused_with_the_difference_named() {
        let dir = tempfile::tempdir().unwrap();
        images(dir.path(), Some(&creds(ALL_CAPS)), SeccompMode::Disabled);
        let err = check(dir.path(), &allowed()).unwrap_err().to_string();
        for part in [
            "CAP_SYS_ADMIN",
            "effective set",
            "without seccomp",
            "container's spec allows",
        ] {
            assert!(err.contains(part), "{part} not in: {err}");
        }
        assert!(!err.contains("CAP_CHOWN"), "allowed caps listed: {err}");
    }

    #[test]
    fn ids_groups_nnp_lsm_and_missing_credentials() {
        let mut a = allowed();
        a.uid = 1000;
        a.gid = 1000;
        a.permitted = CapSet(0);
        a.effective = CapSet(0);
        a.bounding = CapSet(0);
        a.no_new_privs = true;
        a.lsm_label = Some("cri-containerd.apparmor.d".into());
        let c = Creds {
            uids: [1000, 0, 1000, 1000],
            gids: [1000; 4],
            groups: vec![1000, 6],
            lsm_profile: Some("unconfined".into()),
            ..Default::default()
        };
        let t = ThreadState {
            tid: 1,
            comm: None,
            creds: Some(c),
            seccomp: SeccompMode::Filter,
        };
        let why = thread_excess(&t, &a).join("; ");
        for part in ["uid [1000, 0", "groups [6]", "no_new_privs", "LSM label"] {
            assert!(why.contains(part), "{part} not in: {why}");
        }
        let t = ThreadState {
            tid: 1,
            comm: None,
            creds: None,
            seccomp: SeccompMode::Filter,
        };
        assert!(thread_excess(&t, &a)[0].contains("no credentials"));
        assert!(lsm_matches(
            Some("cri-containerd.apparmor.d (enforce)"),
            "cri-containerd.apparmor.d"
        ));
    }

    #[test]
    fn a_root_container_may_hold_other_ids() {
        let mut a = allowed();
        a.permitted = CapSet(a.permitted.0 | 1 << CAP_SETUID | 1 << CAP_SETGID);
        let c = Creds {
            uids: [65534; 4],
            gids: [65534; 4],
            groups: vec![65534],
            ..Default::default()
        };
        let t = ThreadState {
            tid: 1,
            comm: None,
            creds: Some(c),
            seccomp: SeccompMode::Filter,
        };
        assert!(thread_excess(&t, &a).is_empty());
    }

    #[test]
    fn the_target_spec_is_read_from_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0, "additionalGids": [10]},
                "cwd": "/",
                "noNewPrivileges": true,
                "capabilities": {
                    "bounding": ["CAP_CHOWN", "CAP_KILL"],
                    "effective": ["CAP_KILL"],
                    "permitted": ["CAP_CHOWN", "CAP_KILL"]
                }
            },
            "root": {"path": "rootfs"},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}],
                "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}
            }
        });
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        let a = Allowed::from_bundle(dir.path()).unwrap();
        assert_eq!(a.bounding, CapSet(1 | 1 << 5));
        assert_eq!(a.effective, CapSet(1 << 5));
        assert_eq!(a.groups, vec![10]);
        assert!(a.no_new_privs && a.seccomp);
        assert_eq!(a.namespaces, vec![NsKind::Pid, NsKind::Net]);
    }

    #[test]
    fn host_device_nodes_in_dev_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        images(dir.path(), Some(&creds(DEFAULT_CAPS)), SeccompMode::Filter);
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (name, major, minor) in [("null", 1, 3), ("sda", 8, 0), ("mem", 1, 1)] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(if major == 8 {
                tar::EntryType::Block
            } else {
                tar::EntryType::Char
            });
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            h.set_size(0);
            b.append_data(&mut h, name, std::io::empty()).unwrap();
        }
        let gz = b.into_inner().unwrap().finish().unwrap();
        std::fs::write(dir.path().join("tmpfs-dev-77.tar.gz.img"), gz).unwrap();
        let err = device_nodes(dir.path()).unwrap();
        assert_eq!(err.len(), 3);
        let mut a = allowed();
        a.devices = RUNC_DEVICES.to_vec();
        a.namespaces.clear();
        let err = check(dir.path(), &a).unwrap_err().to_string();
        assert!(
            err.contains("b 8:0 (sda)") && err.contains("c 1:1 (mem)"),
            "{err}"
        );
        assert!(!err.contains("null"), "{err}");
        a.devices.extend([('b', 8, 0), ('c', 1, 1)]);
        assert!(device_nodes(dir.path())
            .unwrap()
            .iter()
            .all(|(k, ma, mi, _)| a.devices.contains(&(*k, *ma, *mi))));
    }

    fn mount(fstype: FsType, at: &str, read_only: bool) -> Mount {
        Mount {
            fstype,
            mountpoint: at.into(),
            read_only,
            external: false,
        }
    }

    #[test]
    fn mounts_more_open_than_the_spec_are_refused() {
        let mut a = allowed();
        a.fs_types = vec![
            "proc".into(),
            "sysfs".into(),
            "cgroup".into(),
            "tmpfs".into(),
        ];
        a.read_only_fs = vec!["sysfs".into(), "cgroup".into()];
        a.readonly_paths = vec!["/proc/sys".into(), "/proc/sysrq-trigger".into()];
        a.masked_paths = vec!["/proc/kcore".into()];
        // What runc makes for such a spec (sysrq-trigger absent on the
        // dumping node): fine.
        let unprivileged = vec![
            mount(FsType::Proc, "/proc", false),
            mount(FsType::Proc, "/proc/sys", true),
            mount(FsType::Sysfs, "/sys", true),
            mount(FsType::Cgroup, "/sys/fs/cgroup/memory", true),
            mount(FsType::Tmpfs, "/dev", false),
        ];
        assert!(
            mount_excess(&unprivileged, &a).is_empty(),
            "{:?}",
            mount_excess(&unprivileged, &a)
        );
        // A privileged container's: rw sysfs, no guards, debugfs.
        let privileged = vec![
            mount(FsType::Proc, "/proc", false),
            mount(FsType::Sysfs, "/sys", false),
            mount(FsType::Other(11), "/sys/kernel/debug", false),
        ];
        let why = mount_excess(&privileged, &a).join("; ");
        for part in [
            "sysfs at /sys read-write",
            "debugfs",
            "none of the 3 masked",
        ] {
            assert!(why.contains(part), "{part:?} not in {why}");
        }
        let mut rw_sys = unprivileged.clone();
        rw_sys[1].read_only = false;
        assert!(mount_excess(&rw_sys, &a)[0].contains("/proc/sys read-write"));
    }
}
