//! The manifest: what an archive holds, who made it, and the digests that
//! cover every byte of it (each frame's, or each member's SHA-256 in an
//! archive without frames). It is the archive's last member, written once
//! every digest is known.

use serde::{Deserialize, Serialize};

/// Identifies our archives (and not just any tar).
pub const FORMAT: &str = "criu-shim.checkpoint";
/// Bumped on incompatible changes; readers refuse newer versions.
/// 2: the tenant is recorded, and compressed archives end with an index
/// frame that finds the manifest without decompressing the members.
/// 3: frame digests are BLAKE3, and members covered by the frame table
/// carry no SHA-256 of their own (a checkpoint hashed every byte twice).
pub const VERSION: u32 = 3;
/// 4: a post-copy checkpoint: the private memory is not in the archive
/// but with the source node ([`Manifest::page_source`]). Written only for
/// those, so that shims that cannot fetch memory from a source refuse
/// them instead of restoring a process without its memory.
pub const VERSION_POST_COPY: u32 = 4;
/// The newest version this shim reads.
pub const NEWEST: u32 = VERSION_POST_COPY;

/// What a frame's digest is, by the archive's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameDigest {
    /// Format 2.
    Sha256,
    /// Format 3 on.
    Blake3,
}

impl FrameDigest {
    /// What this shim writes.
    pub const CURRENT: FrameDigest = FrameDigest::Blake3;

    pub fn of_version(version: u32) -> FrameDigest {
        if version >= 3 {
            FrameDigest::Blake3
        } else {
            FrameDigest::Sha256
        }
    }

    pub fn of(self, bytes: &[u8]) -> [u8; 32] {
        match self {
            FrameDigest::Sha256 => {
                use sha2::Digest;
                sha2::Sha256::digest(bytes).into()
            }
            FrameDigest::Blake3 => blake3::hash(bytes).into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub path: String,
    pub size: u64,
    /// Absent when the frame table covers the member (format 3): its
    /// frames' digests are its proof.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Where the member's data starts in the archive's raw (tar) stream:
    /// with [`Manifest::frames`], a reader can fetch it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// One zstd frame of the archive: `[at, len, raw_len, digest]`: its
/// offset and length in the file, the raw (tar) bytes it decodes to (the
/// ones after the previous frame's), and the hex digest of its `len` bytes
/// ([`FrameDigest::of_version`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameRef(pub u64, pub u64, pub u64, pub String);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// How long the container's tasks were frozen (ms), if measured.
    pub frozen_ms: Option<f64>,
    /// How long CRIU's dump took (ms).
    pub criu_ms: Option<f64>,
    /// Bytes of CRIU page images.
    pub pages_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub container_id: String,
    /// Whose checkpoint ([`super::share::Tenant::id`]); a restore for
    /// another tenant is refused. Absent in archives of older shims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Seconds since the epoch.
    pub created: u64,
    pub criu_version: String,
    pub kernel: String,
    pub shim_version: String,
    pub compression: String,
    /// The dump kept established TCP connections.
    pub tcp_established: bool,
    pub stats: Stats,
    pub members: Vec<Member>,
    /// Every frame before the manifest's own, in order (archives of this
    /// shim that are compressed; empty otherwise). Absent in archives of
    /// older shims, which readers fetch whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<FrameRef>,
    /// Post-copy: who serves the memory the archive leaves out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_source: Option<PageSourceRef>,
}

/// Where a post-copy checkpoint's memory is served: the source node's
/// relay (`CRIU_SHIM_POST_COPY_ADDRESS`) and the transfer's session id,
/// which the page stream's handshake proves both sides know. Signed with
/// the manifest, so nobody who can only write to the share can point a
/// restore elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageSourceRef {
    pub address: std::net::SocketAddr,
    /// Hex ([`crate::page_stream::session_hex`]).
    pub session: String,
}

impl Manifest {
    pub fn total_size(&self) -> u64 {
        self.members.iter().map(|m| m.size).sum()
    }
}

/// The running kernel's release, for the manifest.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}
