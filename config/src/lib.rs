//! Every setting of criu-shim, its annotation names and defaults, parsed and
//! validated in one place.
//!
//! Settings reach the shim three ways, and this crate merges them in this
//! order (later wins):
//! 1. built-in defaults ([`ShimConfig::default`]);
//! 2. containerd's runc options for the runtime (`[...runtimes.criu.options]`
//!    in containerd's config: `BinaryName`, `Root`, `SystemdCgroup`,
//!    `NoPivotRoot`, `NoNewKeyring`), so an existing runc runtime config
//!    carries over (containerd 2.x has no `CriuPath`: see `CRIU_SHIM_CRIU`);
//! 3. environment variables of the shim (`CRIU_SHIM_*`), for the settings
//!    containerd's runc options have no field for.
//!
//! See `config/README.md` for the containerd config snippet and the
//! RuntimeClass manifest.

use std::path::{Path, PathBuf};

/// The runtime type containerd knows the shim by.
pub const RUNTIME_ID: &str = "io.containerd.criu.v2";

/// Prefix of every annotation criu-shim reads. List it in containerd's
/// `pod_annotations` (CRI) so pod annotations reach the container's OCI spec.
pub const ANNOTATION_PREFIX: &str = "criu-shim.io/";

/// Annotation naming the archive (on the share) to restore a container from:
/// a key or an archive name, always resolved inside the share. (An
/// absolute path, a directory of images on the node, is refused unless the
/// operator set [`env::LOCAL_IMAGES_DIR`] and the path is beneath it.)
pub const ANNOTATION_RESTORE_FROM: &str = "criu-shim.io/restore-from";

/// Annotation naming where on the share checkpoints of this container go.
pub const ANNOTATION_CHECKPOINT_TO: &str = "criu-shim.io/checkpoint-to";

/// Annotation (`"true"`) making a checkpoint of any container of a pod
/// (the kubelet checkpoint API names one) checkpoint the whole pod, frozen
/// together, as `containerd-shim-criu-v2 checkpoint --pod` does.
pub const ANNOTATION_CHECKPOINT_POD: &str = "criu-shim.io/checkpoint-pod";

/// Annotation choosing how a restore brings memory back: `cold` (every
/// page in place before the tasks run) or `lazy` (the tasks run at once;
/// pages are copied in when touched, and the rest in the background).
/// Unset: the node's [`env::MIGRATION`] setting.
pub const ANNOTATION_MIGRATION: &str = "criu-shim.io/migration";

/// CRI's annotation carrying the pod sandbox id; containers of one pod share a shim.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// CRI's annotation with the Kubernetes namespace of the container's pod:
/// the tenant its checkpoints belong to. containerd sets it; pod authors
/// cannot (only `criu-shim.io/*` pod annotations should be passed through,
/// see `pod_annotations` in containerd-config.toml).
pub const ANNOTATION_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";

/// CRI's annotation with the name of the container's pod.
pub const ANNOTATION_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";

/// CRI's annotation with the container's name in its pod (the name in the
/// pod manifest, the same on every node).
pub const ANNOTATION_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

/// CRI's annotation with the container's image name.
pub const ANNOTATION_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// CRI's annotation telling a pod's sandbox (`sandbox`) from its
/// containers (`container`).
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Where hack/setup installs CRIU 4.2 with its own libraries.
pub const DEFAULT_CRIU: &str = "/opt/criu-shim/bin/criu";

/// Environment variable names.
pub mod env {
    pub const CRIU: &str = "CRIU_SHIM_CRIU";
    pub const RUNC: &str = "CRIU_SHIM_RUNC";
    pub const STAGING_DIR: &str = "CRIU_SHIM_STAGING_DIR";
    pub const SHARE_DIR: &str = "CRIU_SHIM_SHARE_DIR";
    pub const CRIU_TIMEOUT_SECS: &str = "CRIU_SHIM_CRIU_TIMEOUT";
    pub const FETCH_WAIT_SECS: &str = "CRIU_SHIM_FETCH_WAIT";
    pub const ARCHIVE_KEY_FILE: &str = "CRIU_SHIM_ARCHIVE_KEY_FILE";
    pub const LOCAL_IMAGES_DIR: &str = "CRIU_SHIM_LOCAL_IMAGES_DIR";
    pub const ALLOW_CROSS_TENANT: &str = "CRIU_SHIM_ALLOW_CROSS_TENANT";
    pub const MAX_ARCHIVE_BYTES: &str = "CRIU_SHIM_MAX_ARCHIVE_BYTES";
    pub const MAX_ARCHIVE_MEMBERS: &str = "CRIU_SHIM_MAX_ARCHIVE_MEMBERS";
    pub const COMPRESSION: &str = "CRIU_SHIM_COMPRESSION";
    pub const PUBLISH: &str = "CRIU_SHIM_PUBLISH";
    pub const MIGRATION: &str = "CRIU_SHIM_MIGRATION";
    pub const LAZY_TIMEOUT_SECS: &str = "CRIU_SHIM_LAZY_TIMEOUT";
    pub const RESTORE_FETCH: &str = "CRIU_SHIM_RESTORE_FETCH";
    pub const POST_COPY_ADDRESS: &str = "CRIU_SHIM_POST_COPY_ADDRESS";
    pub const POST_COPY_IDLE_SECS: &str = "CRIU_SHIM_POST_COPY_IDLE_TIMEOUT";
    pub const NETWORK_LOCK: &str = "CRIU_SHIM_NETWORK_LOCK";
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the systemd cgroup driver was requested (SystemdCgroup = true) but systemd is not running on this host; set SystemdCgroup = false in the runtime options")]
    SystemdNotRunning,
    #[error("{name}={value:?} is not valid: {why}")]
    BadValue {
        name: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{what} {path} must be an absolute path")]
    NotAbsolute { what: &'static str, path: PathBuf },
}

/// containerd's runc options (`containerd.runc.v1.Options`), the fields we use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuncOptions {
    pub binary_name: String,
    pub root: String,
    pub systemd_cgroup: bool,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
}

/// How archives are compressed when a checkpoint does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionSetting {
    /// Each chunk compressed (zstd -1) only while the share is slower than
    /// the compressor: never costs downtime on a fast share, saves bytes on
    /// a slow one.
    Auto,
    /// A plain tar.
    None,
    /// Every chunk at this zstd level (1-19): the smallest archives, at the
    /// compressor's speed.
    Level(i32),
}

impl CompressionSetting {
    pub fn parse(v: &str) -> Option<CompressionSetting> {
        match v {
            "auto" => Some(Self::Auto),
            "none" | "0" => Some(Self::None),
            "zstd" => Some(Self::Level(1)),
            _ => v
                .strip_prefix("zstd:")
                .unwrap_or(v)
                .parse::<i32>()
                .ok()
                .filter(|l| (1..=19).contains(l))
                .map(Self::Level),
        }
    }
}

/// When a checkpoint's archive is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishMode {
    /// While CRIU dumps: page images go into the (hidden) archive on the
    /// share as CRIU writes them, so publishing ends shortly after the dump.
    Stream,
    /// After the dump, from the complete local images (for shares where a
    /// file held open and growing for the dump's duration is a problem).
    Staged,
}

/// How CRIU keeps a container's network still while it dumps or restores
/// it (packets dropped, so no connection state changes under it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkLock {
    /// Rules through `iptables-restore`, a process per family and step:
    /// CRIU's default.
    Iptables,
    /// A table through libnftables, inside CRIU: no processes to start,
    /// tens of milliseconds less downtime on each node. Needs CRIU built
    /// with libnftables (CRIU 4.2 from Debian is) and nf_tables in the
    /// kernel.
    Nftables,
}

impl NetworkLock {
    pub fn parse(v: &str) -> Option<NetworkLock> {
        match v {
            "iptables" => Some(Self::Iptables),
            "nftables" => Some(Self::Nftables),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }
}

/// How a container migrates: how a restore brings its memory back, and
/// how the kubelet's checkpoint API takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationMode {
    /// Every page in place before the tasks run.
    Cold,
    /// The tasks run as soon as the process tree is back; pages move in
    /// when touched (userfaultfd) and in the background.
    Lazy,
    /// As `Lazy` at restore; and a CheckpointContainer of a container
    /// with a `checkpoint-to` destination is a post-copy checkpoint (its
    /// memory served from the frozen source, which then exits).
    PostCopy,
}

impl MigrationMode {
    pub fn parse(v: &str) -> Option<MigrationMode> {
        match v {
            "cold" => Some(Self::Cold),
            "lazy" => Some(Self::Lazy),
            "post-copy" => Some(Self::PostCopy),
            _ => None,
        }
    }

    /// The restored tasks run before their memory is all in.
    pub fn runs_early(self) -> bool {
        self != Self::Cold
    }
}

/// How a cold restore gets an archive's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreFetch {
    /// Straight from the share into the restored (stopped) tasks, each
    /// frame verified as it is read; the tasks run once every page is in.
    /// Needs userfaultfd and an archive with a frame table, else `Staged`.
    Stream,
    /// The whole archive unpacked and verified into staging first, then
    /// restored by CRIU from there.
    Staged,
}

impl PublishMode {
    pub fn parse(v: &str) -> Option<PublishMode> {
        match v {
            "stream" => Some(Self::Stream),
            "staged" => Some(Self::Staged),
            _ => None,
        }
    }
}

impl RestoreFetch {
    pub fn parse(v: &str) -> Option<RestoreFetch> {
        match v {
            "stream" => Some(Self::Stream),
            "staged" => Some(Self::Staged),
            _ => None,
        }
    }
}

/// `value` of setting `name` as a whole number above zero; else the
/// setting is refused, saying `why`.
fn positive<T>(name: &'static str, value: String, why: &'static str) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
{
    match value.parse::<T>() {
        Ok(n) if n > T::from(0) => Ok(n),
        _ => Err(ConfigError::BadValue { name, value, why }),
    }
}

/// The shim's settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimConfig {
    /// runc binary (a path, or a name looked up in PATH).
    pub runc: PathBuf,
    /// runc's state root (`runc --root`).
    pub runc_root: PathBuf,
    /// The CRIU binary criu-shim drives (and points runc at).
    pub criu: PathBuf,
    /// runc's `--systemd-cgroup` (only where systemd is PID 1).
    pub systemd_cgroup: bool,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
    /// Local directory where checkpoints are staged before publishing.
    pub staging_dir: PathBuf,
    /// Mount point of the file share every node sees.
    pub share_dir: PathBuf,
    /// Longest a CRIU dump or restore may take.
    pub criu_timeout_secs: u64,
    /// How long a restore waits for its archive to show up on the share
    /// (network file systems make new files visible to other nodes late).
    pub fetch_wait_secs: u64,
    /// A secret shared by the nodes: archives are signed with it, and
    /// restores refuse archives it did not sign.
    pub archive_key_file: Option<PathBuf>,
    /// Off by default. When set, `restore-from` may also name a directory
    /// of CRIU images on the node, but only beneath this one (an
    /// operator's tool: whoever can write there can restore anything the
    /// target spec allows).
    pub local_images_dir: Option<PathBuf>,
    /// Off by default: restores accept only archives made for the
    /// restoring container's tenant (its Kubernetes namespace).
    pub allow_cross_tenant: bool,
    /// Most bytes an archive may unpack to (all members together); a
    /// restore also needs that much free space in staging.
    pub max_archive_bytes: u64,
    /// Most members an archive may have.
    pub max_archive_members: usize,
    pub compression: CompressionSetting,
    pub publish: PublishMode,
    /// How CRIU locks the network at dump and restore.
    pub network_lock: NetworkLock,
    /// How restores bring memory back unless the container's
    /// [`ANNOTATION_MIGRATION`] says.
    pub migration: MigrationMode,
    /// Longest a lazily restored container waits for the share to give
    /// one of its pages before it is killed (a cut network).
    pub lazy_timeout_secs: u64,
    pub restore_fetch: RestoreFetch,
    /// Where this node serves a post-copy checkpoint's memory to the
    /// restoring node: the address the relay binds and the manifest names
    /// (port 0: any free port). Unset: post-copy checkpoints are refused.
    pub post_copy_address: Option<std::net::SocketAddr>,
    /// How long the source node waits for the restoring node (to connect,
    /// then between two requests) before it calls a post-copy transfer
    /// off and the source runs on. Longer than the restoring node's
    /// `lazy_timeout_secs`, so that a cut network never leaves both
    /// copies running.
    pub post_copy_idle_secs: u64,
}

impl ShimConfig {
    /// Defaults for containerd namespace `namespace`.
    pub fn defaults(namespace: &str) -> Self {
        ShimConfig {
            runc: "runc".into(),
            runc_root: Path::new("/run/containerd/runc").join(namespace),
            criu: if Path::new(DEFAULT_CRIU).exists() {
                DEFAULT_CRIU.into()
            } else {
                "criu".into()
            },
            systemd_cgroup: false,
            no_pivot_root: false,
            no_new_keyring: false,
            staging_dir: "/var/lib/criu-shim/staging".into(),
            share_dir: "/var/lib/criu-shim/share".into(),
            criu_timeout_secs: 600,
            fetch_wait_secs: 30,
            archive_key_file: None,
            local_images_dir: None,
            allow_cross_tenant: false,
            max_archive_bytes: 256 << 30,
            max_archive_members: 50_000,
            compression: CompressionSetting::Auto,
            publish: PublishMode::Stream,
            network_lock: NetworkLock::Nftables,
            migration: MigrationMode::Cold,
            lazy_timeout_secs: 30,
            restore_fetch: RestoreFetch::Stream,
            post_copy_address: None,
            post_copy_idle_secs: 60,
        }
    }

    /// Applies containerd's runc options and then the environment.
    pub fn resolve(
        namespace: &str,
        runc: Option<&RuncOptions>,
        env: impl Fn(&str) -> Option<String>,
        systemd_running: bool,
    ) -> Result<Self, ConfigError> {
        let mut c = Self::defaults(namespace);
        if let Some(o) = runc {
            if o.systemd_cgroup && !systemd_running {
                return Err(ConfigError::SystemdNotRunning);
            }
            if !o.binary_name.is_empty() {
                c.runc = o.binary_name.clone().into();
            }
            if !o.root.is_empty() {
                c.runc_root = Path::new(&o.root).join(namespace);
            }
            c.systemd_cgroup = o.systemd_cgroup;
            c.no_pivot_root = o.no_pivot_root;
            c.no_new_keyring = o.no_new_keyring;
        }
        if let Some(v) = env(env::RUNC) {
            c.runc = v.into();
        }
        if let Some(v) = env(env::CRIU) {
            c.criu = v.into();
        }
        if let Some(v) = env(env::STAGING_DIR) {
            c.staging_dir = v.into();
        }
        if let Some(v) = env(env::SHARE_DIR) {
            c.share_dir = v.into();
        }
        if let Some(v) = env(env::CRIU_TIMEOUT_SECS) {
            c.criu_timeout_secs = positive(
                env::CRIU_TIMEOUT_SECS,
                v,
                "expected a whole number of seconds > 0",
            )?;
        }
        if let Some(v) = env(env::FETCH_WAIT_SECS) {
            c.fetch_wait_secs = v.parse::<u64>().map_err(|_| ConfigError::BadValue {
                name: env::FETCH_WAIT_SECS,
                value: v,
                why: "expected a whole number of seconds (0: do not wait)",
            })?;
        }
        if let Some(v) = env(env::RESTORE_FETCH) {
            c.restore_fetch = RestoreFetch::parse(&v).ok_or(ConfigError::BadValue {
                name: env::RESTORE_FETCH,
                value: v,
                why: "expected stream or staged",
            })?;
        }
        if let Some(v) = env(env::LAZY_TIMEOUT_SECS) {
            c.lazy_timeout_secs = positive(
                env::LAZY_TIMEOUT_SECS,
                v,
                "expected a whole number of seconds > 0",
            )?;
        }
        if let Some(v) = env(env::POST_COPY_ADDRESS).filter(|v| !v.is_empty()) {
            c.post_copy_address = Some(parse_address(&v).ok_or(ConfigError::BadValue {
                name: env::POST_COPY_ADDRESS,
                value: v,
                why: "expected this node's IP address, optionally with a port (10.0.0.5, \
                      10.0.0.5:7300, [fd00::5]:7300); 0.0.0.0 is not an address the \
                      restoring node can reach",
            })?);
        }
        if let Some(v) = env(env::POST_COPY_IDLE_SECS) {
            c.post_copy_idle_secs = positive(
                env::POST_COPY_IDLE_SECS,
                v,
                "expected a whole number of seconds > 0",
            )?;
        }
        if c.post_copy_idle_secs <= c.lazy_timeout_secs {
            return Err(ConfigError::BadValue {
                name: env::POST_COPY_IDLE_SECS,
                value: c.post_copy_idle_secs.to_string(),
                why: "must be longer than CRIU_SHIM_LAZY_TIMEOUT: the restoring node must \
                      give up on a silent source before the source gives up on it and runs \
                      on, or both copies could run",
            });
        }
        if let Some(v) = env(env::ARCHIVE_KEY_FILE).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(v);
            if !path.is_absolute() {
                return Err(ConfigError::NotAbsolute {
                    what: "archive key file",
                    path,
                });
            }
            c.archive_key_file = Some(path);
        }
        if let Some(v) = env(env::LOCAL_IMAGES_DIR).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(v);
            if !path.is_absolute() {
                return Err(ConfigError::NotAbsolute {
                    what: "local images dir",
                    path,
                });
            }
            c.local_images_dir = Some(path);
        }
        if let Some(v) = env(env::ALLOW_CROSS_TENANT) {
            c.allow_cross_tenant = match v.as_str() {
                "true" | "1" => true,
                "false" | "0" | "" => false,
                _ => {
                    return Err(ConfigError::BadValue {
                        name: env::ALLOW_CROSS_TENANT,
                        value: v,
                        why: "expected true or false",
                    })
                }
            };
        }
        if let Some(v) = env(env::MAX_ARCHIVE_BYTES) {
            c.max_archive_bytes =
                positive(env::MAX_ARCHIVE_BYTES, v, "expected a number of bytes > 0")?;
        }
        if let Some(v) = env(env::MAX_ARCHIVE_MEMBERS) {
            c.max_archive_members = positive(env::MAX_ARCHIVE_MEMBERS, v, "expected a number > 0")?;
        }
        if let Some(v) = env(env::COMPRESSION) {
            c.compression = CompressionSetting::parse(&v).ok_or(ConfigError::BadValue {
                name: env::COMPRESSION,
                value: v,
                why: "expected auto, none, zstd or a zstd level 1-19 (zstd:3)",
            })?;
        }
        if let Some(v) = env(env::PUBLISH) {
            c.publish = PublishMode::parse(&v).ok_or(ConfigError::BadValue {
                name: env::PUBLISH,
                value: v,
                why: "expected stream or staged",
            })?;
        }
        if let Some(v) = env(env::NETWORK_LOCK) {
            c.network_lock = NetworkLock::parse(&v).ok_or(ConfigError::BadValue {
                name: env::NETWORK_LOCK,
                value: v,
                why: "expected nftables or iptables",
            })?;
        }
        if let Some(v) = env(env::MIGRATION) {
            c.migration = MigrationMode::parse(&v).ok_or(ConfigError::BadValue {
                name: env::MIGRATION,
                value: v,
                why: "expected cold, lazy or post-copy",
            })?;
        }
        for (what, path) in [
            ("runc root", &c.runc_root),
            ("staging dir", &c.staging_dir),
            ("share dir", &c.share_dir),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::NotAbsolute {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(c)
    }

    /// From the shim process's real environment.
    pub fn from_env(namespace: &str, runc: Option<&RuncOptions>) -> Result<Self, ConfigError> {
        Self::resolve(
            namespace,
            runc,
            |k| std::env::var(k).ok().filter(|v| !v.is_empty()),
            systemd_running(),
        )
    }
}

/// `IP` or `IP:PORT` (IPv6 in brackets with a port), a unicast address
/// another node can connect to.
fn parse_address(v: &str) -> Option<std::net::SocketAddr> {
    let addr = v
        .parse::<std::net::SocketAddr>()
        .ok()
        .or_else(|| Some(std::net::SocketAddr::new(v.parse().ok()?, 0)))?;
    (!addr.ip().is_unspecified() && !addr.ip().is_multicast()).then_some(addr)
}

/// systemd's own test: the directory exists only when systemd is PID 1.
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The shim grouping key: containers of one pod share one shim process.
pub fn grouping<'a>(id: &'a str, annotations: impl Fn(&str) -> Option<&'a str>) -> &'a str {
    annotations(ANNOTATION_SANDBOX_ID)
        .filter(|s| !s.is_empty())
        .unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn compression_and_publishing_are_settings() {
        let c = ShimConfig::resolve("n", None, no_env, false).unwrap();
        assert_eq!(c.compression, CompressionSetting::Auto);
        assert_eq!(c.publish, PublishMode::Stream);
        for (v, want) in [
            ("none", CompressionSetting::None),
            ("zstd", CompressionSetting::Level(1)),
            ("zstd:9", CompressionSetting::Level(9)),
            ("3", CompressionSetting::Level(3)),
        ] {
            let env = |k: &str| (k == env::COMPRESSION).then(|| v.to_string());
            let c = ShimConfig::resolve("n", None, env, false).unwrap();
            assert_eq!(c.compression, want, "{v}");
        }
        for bad in ["zstd:0", "fast", "22"] {
            let env = |k: &str| (k == env::COMPRESSION).then(|| bad.to_string());
            let e = ShimConfig::resolve("n", None, env, false).unwrap_err();
            assert!(e.to_string().contains("CRIU_SHIM_COMPRESSION"), "{e}");
        }
        let env = |k: &str| (k == env::PUBLISH).then(|| "staged".to_string());
        let c = ShimConfig::resolve("n", None, env, false).unwrap();
        assert_eq!(c.publish, PublishMode::Staged);
        let env = |k: &str| (k == env::PUBLISH).then(|| "later".to_string());
        assert!(ShimConfig::resolve("n", None, env, false).is_err());
        assert_eq!(c.network_lock, NetworkLock::Nftables);
        let env = |k: &str| (k == env::NETWORK_LOCK).then(|| "iptables".to_string());
        let c2 = ShimConfig::resolve("n", None, env, false).unwrap();
        assert_eq!(c2.network_lock, NetworkLock::Iptables);
        let env = |k: &str| (k == env::NETWORK_LOCK).then(|| "nft".to_string());
        let e = ShimConfig::resolve("n", None, env, false).unwrap_err();
        assert!(
            e.to_string().contains("expected nftables or iptables"),
            "{e}"
        );
        assert_eq!(c.migration, MigrationMode::Cold);
        let env = |k: &str| (k == env::MIGRATION).then(|| "lazy".to_string());
        let c = ShimConfig::resolve("n", None, env, false).unwrap();
        assert_eq!(c.migration, MigrationMode::Lazy);
        let env = |k: &str| (k == env::MIGRATION).then(|| "post-copy".to_string());
        let c = ShimConfig::resolve("n", None, env, false).unwrap();
        assert_eq!(c.migration, MigrationMode::PostCopy);
        assert!(c.migration.runs_early());
        assert_eq!(c.restore_fetch, RestoreFetch::Stream);
        let env = |k: &str| (k == env::RESTORE_FETCH).then(|| "staged".to_string());
        let c = ShimConfig::resolve("n", None, env, false).unwrap();
        assert_eq!(c.restore_fetch, RestoreFetch::Staged);
        let env = |k: &str| (k == env::LAZY_TIMEOUT_SECS).then(|| "0".to_string());
        assert!(ShimConfig::resolve("n", None, env, false).is_err());
        let env = |k: &str| (k == env::MIGRATION).then(|| "warm".to_string());
        let e = ShimConfig::resolve("n", None, env, false).unwrap_err();
        assert!(e.to_string().contains("CRIU_SHIM_MIGRATION"), "{e}");
    }

    #[test]
    fn post_copy_settings_are_validated() {
        let with = |pairs: &'static [(&'static str, &'static str)]| {
            ShimConfig::resolve(
                "n",
                None,
                move |k| {
                    pairs
                        .iter()
                        .find(|(n, _)| *n == k)
                        .map(|(_, v)| v.to_string())
                },
                false,
            )
        };
        let c = with(&[]).unwrap();
        assert_eq!(c.post_copy_address, None);
        let c = with(&[(env::POST_COPY_ADDRESS, "10.0.0.5")]).unwrap();
        assert_eq!(c.post_copy_address, Some("10.0.0.5:0".parse().unwrap()));
        let c = with(&[(env::POST_COPY_ADDRESS, "[fd00::5]:7300")]).unwrap();
        assert_eq!(c.post_copy_address, Some("[fd00::5]:7300".parse().unwrap()));
        for bad in ["0.0.0.0", "node-a", "10.0.0.5:x", "224.0.0.1"] {
            let pairs: &'static [(&str, &str)] =
                Box::leak(vec![(env::POST_COPY_ADDRESS, bad)].into_boxed_slice());
            let e = with(pairs).unwrap_err().to_string();
            assert!(e.contains(env::POST_COPY_ADDRESS), "{bad}: {e}");
        }
        // The source must outwait the restoring node's own timeout.
        let e = with(&[(env::POST_COPY_IDLE_SECS, "30")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CRIU_SHIM_LAZY_TIMEOUT"), "{e}");
        let c = with(&[
            (env::POST_COPY_IDLE_SECS, "20"),
            (env::LAZY_TIMEOUT_SECS, "10"),
        ])
        .unwrap();
        assert_eq!(c.post_copy_idle_secs, 20);
    }

    #[test]
    fn defaults_are_namespaced() {
        let c = ShimConfig::resolve("k8s.io", None, no_env, false).unwrap();
        assert_eq!(c.runc_root, Path::new("/run/containerd/runc/k8s.io"));
        assert_eq!(c.runc, Path::new("runc"));
    }

    #[test]
    fn runc_options_carry_over() {
        let o = RuncOptions {
            binary_name: "/usr/local/bin/runc".into(),
            root: "/run/myrunc".into(),
            ..Default::default()
        };
        let c = ShimConfig::resolve("default", Some(&o), no_env, false).unwrap();
        assert_eq!(c.runc, Path::new("/usr/local/bin/runc"));
        assert_eq!(c.runc_root, Path::new("/run/myrunc/default"));
        assert!(!c.systemd_cgroup);
    }

    #[test]
    fn systemd_cgroup_without_systemd_is_refused_with_the_fix() {
        let o = RuncOptions {
            systemd_cgroup: true,
            ..Default::default()
        };
        let err = ShimConfig::resolve("default", Some(&o), no_env, false).unwrap_err();
        assert_eq!(err, ConfigError::SystemdNotRunning);
        assert!(err.to_string().contains("SystemdCgroup = false"));
        assert!(ShimConfig::resolve("default", Some(&o), no_env, true).is_ok());
    }

    #[test]
    fn environment_overrides_and_is_validated() {
        let env = |k: &str| match k {
            env::CRIU => Some("/x/criu".to_string()),
            env::SHARE_DIR => Some("/mnt/share".to_string()),
            _ => None,
        };
        let c = ShimConfig::resolve("default", None, env, false).unwrap();
        assert_eq!(c.criu, Path::new("/x/criu"));
        assert_eq!(c.share_dir, Path::new("/mnt/share"));

        let bad = |k: &str| (k == env::CRIU_TIMEOUT_SECS).then(|| "soon".to_string());
        let err = ShimConfig::resolve("default", None, bad, false).unwrap_err();
        assert!(err.to_string().contains("CRIU_SHIM_CRIU_TIMEOUT"), "{err}");

        // Counts and durations must be whole numbers above zero.
        for name in [
            env::CRIU_TIMEOUT_SECS,
            env::LAZY_TIMEOUT_SECS,
            env::MAX_ARCHIVE_BYTES,
            env::MAX_ARCHIVE_MEMBERS,
        ] {
            for (value, ok) in [("5", true), ("0", false), ("-1", false), ("x", false)] {
                let env = |k: &str| (k == name).then(|| value.to_string());
                let got = ShimConfig::resolve("default", None, env, false);
                assert_eq!(got.is_ok(), ok, "{name}={value}: {got:?}");
                if let Err(e) = got {
                    assert!(e.to_string().contains(name), "{e}");
                }
            }
        }

        let rel = |k: &str| (k == env::SHARE_DIR).then(|| "share".to_string());
        assert!(matches!(
            ShimConfig::resolve("default", None, rel, false),
            Err(ConfigError::NotAbsolute { .. })
        ));
    }

    #[test]
    fn pods_share_a_shim() {
        let ann = |k: &str| (k == ANNOTATION_SANDBOX_ID).then_some("pod123");
        assert_eq!(grouping("ctr1", ann), "pod123");
        assert_eq!(grouping("ctr1", |_| None), "ctr1");
    }
}
