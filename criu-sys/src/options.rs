//! The options of a dump, pre-dump, restore or page-server request.
//!
//! [`Options`] owns every descriptor it refers to (images dir, work dir,
//! inherited fds), so they stay open exactly as long as the request needs
//! them, and the transport knows which fds the CRIU child must inherit.
//! Options that change behaviour remember the first CRIU release whose RPC
//! knows them: an older CRIU would silently ignore them (see [`crate::version`]).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use crate::error::{Error, Result};
use crate::rpc;
use crate::version::Version;

/// CRIU's log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Msg = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

/// How CRIU handles the cgroups of the tree (`--manage-cgroups=MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    Ignore,
    None,
    Props,
    Soft,
    Full,
    Strict,
    Default,
}

/// How CRIU keeps the network quiet while the tree is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkLock {
    Iptables,
    Nftables,
    /// Do not lock; the caller locks the network itself.
    Skip,
}

/// A namespace to join at restore (`--join-ns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinNs {
    /// "net", "ipc", "uts", "time", "user", "mnt", "pid", "cgroup".
    pub ns: String,
    /// A path such as /proc/PID/ns/net or /var/run/netns/NAME.
    pub file: String,
    pub extra: Option<String>,
}

/// Opens a directory for `images_dir` / `work_dir`.
pub fn open_dir(path: &Path) -> Result<OwnedFd> {
    open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(format!("open directory {}", path.display()), e.into()))
}

/// Options for one request. Build with the chained setters.
#[derive(Debug, Default)]
pub struct Options {
    raw: rpc::CriuOpts,
    /// Descriptors referenced by `raw`, kept open for the request.
    owned: Vec<OwnedFd>,
    /// Descriptors the CRIU child must inherit at the same number.
    inherited: Vec<RawFd>,
    requires: Vec<(&'static str, Version)>,
}

macro_rules! flag {
    ($(#[$doc:meta])* $name:ident, $setter:ident) => {
        $(#[$doc])*
        pub fn $name(mut self, on: bool) -> Self {
            self.raw.$setter(on);
            self
        }
    };
}

impl Options {
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the images are written (dump) or read (restore). Required for
    /// dump, pre-dump and restore.
    pub fn images_dir(mut self, dir: OwnedFd) -> Self {
        self.raw.set_images_dir_fd(dir.as_raw_fd());
        self.owned.push(dir);
        self
    }

    /// Where CRIU writes its log and temporary files (default: images dir).
    pub fn work_dir(mut self, dir: OwnedFd) -> Self {
        self.raw.set_work_dir_fd(dir.as_raw_fd());
        self.owned.push(dir);
        self
    }

    /// Log file name, relative to the work dir (CRIU allows no sub-directories).
    pub fn log_file(mut self, name: &str) -> Self {
        self.raw.set_log_file(name.to_string());
        self
    }

    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.raw.set_log_level(level as i32);
        self
    }

    /// Root pid of the tree to dump.
    pub fn pid(mut self, pid: i32) -> Self {
        self.raw.set_pid(pid);
        self
    }

    flag!(
        /// Keep the tree running after the dump (default: kill it).
        leave_running, set_leave_running
    );
    flag!(tcp_established, set_tcp_established);
    flag!(
        /// Close established TCP connections at restore instead of restoring them.
        tcp_close, set_tcp_close
    );
    flag!(tcp_skip_in_flight, set_tcp_skip_in_flight);
    flag!(ext_unix_sk, set_ext_unix_sk);
    flag!(file_locks, set_file_locks);
    flag!(shell_job, set_shell_job);
    flag!(
        /// Let the restored tree be a sibling of the caller (its child), not of CRIU.
        rst_sibling, set_rst_sibling
    );
    flag!(
        /// Send `notify` messages to the callback.
        notify_scripts, set_notify_scripts
    );
    flag!(lazy_pages, set_lazy_pages);
    flag!(track_mem, set_track_mem);
    flag!(auto_dedup, set_auto_dedup);
    flag!(link_remap, set_link_remap);
    flag!(evasive_devices, set_evasive_devices);
    flag!(weak_sysctls, set_weak_sysctls);
    flag!(auto_ext_mnt, set_auto_ext_mnt);
    flag!(ext_sharing, set_ext_sharing);
    flag!(ext_masters, set_ext_masters);
    flag!(mntns_compat_mode, set_mntns_compat_mode);

    /// Leave the tree stopped (SIGSTOP) after dump or restore.
    pub fn leave_stopped(mut self, on: bool) -> Self {
        self.raw.set_leave_stopped(on);
        self.require("leave_stopped", Version::new(3, 19, 0))
    }

    /// Ask CRIU to send a pty master it could not reattach back to us
    /// (the `orphan-pts-master` notification carries it).
    pub fn orphan_pts_master(mut self, on: bool) -> Self {
        self.raw.set_orphan_pts_master(on);
        self
    }

    /// Root of the restored tree's mount namespace (a container's rootfs).
    pub fn root(mut self, path: &str) -> Self {
        self.raw.set_root(path.to_string());
        self
    }

    /// Whether and how CRIU restores cgroups.
    pub fn manage_cgroups(mut self, mode: CgroupMode) -> Self {
        self.raw.set_manage_cgroups(mode != CgroupMode::Ignore);
        self.raw.set_manage_cgroups_mode(match mode {
            CgroupMode::Ignore => rpc::Criu_cg_mode::IGNORE,
            CgroupMode::None => rpc::Criu_cg_mode::CG_NONE,
            CgroupMode::Props => rpc::Criu_cg_mode::PROPS,
            CgroupMode::Soft => rpc::Criu_cg_mode::SOFT,
            CgroupMode::Full => rpc::Criu_cg_mode::FULL,
            CgroupMode::Strict => rpc::Criu_cg_mode::STRICT,
            CgroupMode::Default => rpc::Criu_cg_mode::DEFAULT,
        });
        self
    }

    /// Restore cgroups of `controller` (all controllers when `None`) under `path`.
    pub fn cg_root(mut self, controller: Option<&str>, path: &str) -> Self {
        let mut root = rpc::Cgroup_root::new();
        if let Some(c) = controller {
            root.set_ctrl(c.to_string());
        }
        root.set_path(path.to_string());
        self.raw.cg_root.push(root);
        self
    }

    /// Freeze the tree with this freezer cgroup instead of ptrace-stopping it.
    pub fn freeze_cgroup(mut self, path: &str) -> Self {
        self.raw.set_freeze_cgroup(path.to_string());
        self
    }

    /// Map an external bind mount: `key` at dump names the mount point, at
    /// restore it names what to bind there (`--ext-mount-map`).
    pub fn ext_mnt(mut self, key: &str, value: &str) -> Self {
        let mut m = rpc::Ext_mount_map::new();
        m.set_key(key.to_string());
        m.set_val(value.to_string());
        self.raw.ext_mnt.push(m);
        self
    }

    /// A resource external to the tree (`--external`), e.g. `mnt[/a]:a`,
    /// `net[4026531992]:extnet`, `veth[eth0]:veth123`.
    pub fn external(mut self, spec: &str) -> Self {
        self.raw.external.push(spec.to_string());
        self
    }

    /// Hand `fd` to CRIU under `key` (`--inherit-fd fd[N]:key`): at restore,
    /// the file that had that key is replaced by this descriptor (stdio pipes,
    /// for example). The child inherits the descriptor at the same number.
    pub fn inherit_fd(mut self, key: &str, fd: OwnedFd) -> Self {
        let mut inh = rpc::Inherit_fd::new();
        inh.set_key(key.to_string());
        inh.set_fd(fd.as_raw_fd());
        self.raw.inherit_fd.push(inh);
        self.inherited.push(fd.as_raw_fd());
        self.owned.push(fd);
        self
    }

    /// Join an existing namespace at restore instead of creating one.
    pub fn join_ns(mut self, join: JoinNs) -> Self {
        let mut j = rpc::Join_namespace::new();
        j.set_ns(join.ns);
        j.set_ns_file(join.file);
        if let Some(extra) = join.extra {
            j.set_extra_opt(extra);
        }
        self.raw.join_ns.push(j);
        self
    }

    /// Namespaces (CLONE_NEW* bits) to create empty at restore.
    pub fn empty_ns(mut self, flags: u32) -> Self {
        self.raw.set_empty_ns(flags);
        self
    }

    /// Page server to send pages to (dump) or to listen on (page-server).
    pub fn page_server(mut self, address: &str, port: u16) -> Self {
        let mut ps = rpc::Criu_page_server_info::new();
        ps.set_address(address.to_string());
        ps.set_port(i32::from(port));
        self.raw.ps = Some(ps).into();
        self
    }

    /// Images of a previous pre-dump, relative to the images dir.
    pub fn parent_img(mut self, path: &str) -> Self {
        self.raw.set_parent_img(path.to_string());
        self
    }

    /// Largest deleted-but-open file CRIU copies into the images, in bytes.
    pub fn ghost_limit(mut self, bytes: u32) -> Self {
        self.raw.set_ghost_limit(bytes);
        self
    }

    pub fn network_lock(mut self, method: NetworkLock) -> Self {
        self.raw.set_network_lock(match method {
            NetworkLock::Iptables => rpc::Criu_network_lock_method::IPTABLES,
            NetworkLock::Nftables => rpc::Criu_network_lock_method::NFTABLES,
            NetworkLock::Skip => rpc::Criu_network_lock_method::SKIP,
        });
        self.require("network_lock", Version::new(3, 16, 0))
    }

    /// CRIU's own limit, in seconds, for freezing the tree (`--timeout`).
    /// The whole-request deadline is [`crate::Criu::deadline`].
    pub fn freeze_timeout(mut self, secs: u32) -> Self {
        self.raw.set_timeout(secs);
        self
    }

    pub fn lsm_profile(mut self, profile: &str) -> Self {
        self.raw.set_lsm_profile(profile.to_string());
        self
    }

    /// A CRIU configuration file to read (lowest priority under RPC options).
    pub fn config_file(mut self, path: &str) -> Self {
        self.raw.set_config_file(path.to_string());
        self
    }

    pub fn skip_mnt(mut self, mountpoint: &str) -> Self {
        self.raw.skip_mnt.push(mountpoint.to_string());
        self
    }

    pub fn enable_fs(mut self, fs: &str) -> Self {
        self.raw.enable_fs.push(fs.to_string());
        self
    }

    /// Ask CRIU to write dump/restore statistics (`stats-dump`, `stats-restore`).
    pub fn display_stats(mut self, on: bool) -> Self {
        self.raw.set_display_stats(on);
        self.require("display_stats", Version::new(4, 0, 0))
    }

    /// Options as a client sent them (a relay standing in for CRIU). The
    /// descriptors they name must be valid in this process; mark the ones
    /// CRIU must inherit with [`Options::inherit_raw_fd`].
    pub fn from_rpc(raw: rpc::CriuOpts) -> Self {
        Options {
            raw,
            ..Default::default()
        }
    }

    /// Keeps `fd` open across the request and lets CRIU inherit it at the
    /// same number (for `inherit_fd` entries of [`Options::from_rpc`]).
    pub fn own_inherited_fd(mut self, fd: OwnedFd) -> Self {
        self.inherited.push(fd.as_raw_fd());
        self.owned.push(fd);
        self
    }

    /// Keeps `fd` open for the request without CRIU inheriting it (images
    /// and work dirs, which CRIU reaches through /proc/<our pid>/fd).
    pub fn own_fd(mut self, fd: OwnedFd) -> Self {
        self.owned.push(fd);
        self
    }

    /// The generated message, to read what a relayed request asks for.
    pub fn raw(&self) -> &rpc::CriuOpts {
        &self.raw
    }

    /// The generated message, for fields without a setter of their own.
    pub fn raw_mut(&mut self) -> &mut rpc::CriuOpts {
        &mut self.raw
    }

    fn require(mut self, feature: &'static str, version: Version) -> Self {
        self.requires.push((feature, version));
        self
    }

    /// The newest CRIU these options need, with the option that needs it.
    pub fn required_version(&self) -> Option<(&'static str, Version)> {
        self.requires.iter().copied().max_by_key(|(_, v)| *v)
    }

    pub(crate) fn has_images_dir(&self) -> bool {
        self.raw.has_images_dir_fd()
    }

    pub(crate) fn work_dir_fd(&self) -> Option<RawFd> {
        if self.raw.has_work_dir_fd() {
            Some(self.raw.work_dir_fd())
        } else if self.raw.has_images_dir_fd() {
            Some(self.raw.images_dir_fd())
        } else {
            None
        }
    }

    pub(crate) fn log_file_name(&self) -> Option<&str> {
        self.raw.log_file.as_deref()
    }

    pub(crate) fn inherited_fds(&self) -> &[RawFd] {
        &self.inherited
    }

    pub(crate) fn to_rpc(&self) -> rpc::CriuOpts {
        let mut opts = self.raw.clone();
        // images_dir_fd is a required field; VERSION-like requests never
        // carry options, so any request that does needs one set.
        if !opts.has_images_dir_fd() {
            opts.set_images_dir_fd(-1);
        }
        opts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    fn devnull() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn builder_sets_fields_and_keeps_fds() {
        let img = devnull();
        let img_raw = img.as_raw_fd();
        let stdin = devnull();
        let stdin_raw = stdin.as_raw_fd();
        let opts = Options::new()
            .images_dir(img)
            .pid(42)
            .leave_running(true)
            .tcp_established(true)
            .manage_cgroups(CgroupMode::Soft)
            .cg_root(None, "/kubepods/x")
            .ext_mnt("/etc/hosts", "/etc/hosts")
            .external("mnt[/data]:data")
            .inherit_fd("pipe:[1234]", stdin)
            .network_lock(NetworkLock::Nftables)
            .ghost_limit(1 << 20)
            .log_file("dump.log")
            .log_level(LogLevel::Debug);
        let raw = opts.to_rpc();
        assert_eq!(raw.images_dir_fd(), img_raw);
        assert_eq!(raw.pid(), 42);
        assert!(raw.leave_running() && raw.tcp_established());
        assert!(raw.manage_cgroups());
        assert_eq!(raw.manage_cgroups_mode(), rpc::Criu_cg_mode::SOFT);
        assert_eq!(raw.cg_root[0].path(), "/kubepods/x");
        assert!(!raw.cg_root[0].has_ctrl());
        assert_eq!(raw.ext_mnt[0].key(), "/etc/hosts");
        assert_eq!(raw.external, vec!["mnt[/data]:data".to_string()]);
        assert_eq!(raw.inherit_fd[0].fd(), stdin_raw);
        assert_eq!(opts.inherited_fds(), &[stdin_raw]);
        assert_eq!(raw.network_lock(), rpc::Criu_network_lock_method::NFTABLES);
        assert_eq!(raw.log_level(), 4);
        assert_eq!(opts.log_file_name(), Some("dump.log"));
        assert_eq!(
            opts.required_version(),
            Some(("network_lock", Version::new(3, 16, 0)))
        );
    }

    #[test]
    fn unset_fields_stay_off_the_wire() {
        // An option we never set must not be sent at all: an explicit
        // "false" or "0" can override CRIU's config file or defaults.
        let raw = Options::new().images_dir(devnull()).to_rpc();
        assert!(!raw.has_leave_running());
        assert!(!raw.has_log_level());
        assert_eq!(raw.log_level(), 2, "CRIU's proto default");
        assert_eq!(raw.ghost_limit(), 0x100000, "CRIU's proto default");
        let bytes = raw.write_to_bytes().unwrap();
        // Only field 1 (images_dir_fd): tag byte + varint.
        assert_eq!(bytes[0], 0x08);
        assert!(bytes.len() <= 6, "{bytes:?}");
    }

    #[test]
    fn newest_requirement_wins() {
        let opts = Options::new()
            .network_lock(NetworkLock::Skip)
            .leave_stopped(true)
            .display_stats(true);
        assert_eq!(
            opts.required_version(),
            Some(("display_stats", Version::new(4, 0, 0)))
        );
    }
}
