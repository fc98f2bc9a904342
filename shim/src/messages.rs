//! Every message that crosses a process boundary, typed, in one place:
//! both sides of each read and write these structs, never a JSON blob.
//!
//! | message | from | to | how |
//! |---|---|---|---|
//! | [`FrontStats`] | the CRIU front (`criu swrk`, under runc) | the shim | a file in runc's work dir |
//! | [`CheckpointRequest`] | our CLI | the shim | the Checkpoint RPC's options (JSON `Any`) |
//! | [`CheckpointReport`] | the shim | our CLI | a file in the directory the RPC names |
//! | [`ShimState`] | the shim | `shim delete` after a crash | a file in the bundle |
//! | [`ProgressReport`] | the shim, while it checkpoints | our CLI | a file beside the report, rewritten |

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the CRIU front measured and, on failure, CRIU's own words and
/// what kind of failure it was (so the shim can map it to the right
/// containerd error code).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FrontStats {
    pub criu_ms: f64,
    pub frozen_ms: Option<f64>,
    pub error: Option<FrontFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontFailure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// CRIU ran past its deadline and was stopped.
    Timeout,
    /// CRIU is missing, too old, or lacks a feature on this node.
    Unsupported,
    /// CRIU tried and failed.
    Criu,
}

impl FailureKind {
    pub fn of(e: &criu_sys::Error) -> FailureKind {
        match e {
            criu_sys::Error::Timeout { .. } => FailureKind::Timeout,
            criu_sys::Error::BinaryNotFound { .. }
            | criu_sys::Error::TooOld { .. }
            | criu_sys::Error::Unsupported { .. } => FailureKind::Unsupported,
            _ => FailureKind::Criu,
        }
    }
}

impl FrontStats {
    /// Name of the file in runc's work directory.
    pub const FILE: &'static str = "criu-shim-front.json";

    pub fn write(&self, work_dir: &Path) {
        if let Ok(json) = serde_json::to_vec(self) {
            let _ = std::fs::write(work_dir.join(Self::FILE), json);
        }
    }

    /// What the front left in `work_dir` (default if nothing).
    pub fn read(work_dir: &Path) -> FrontStats {
        std::fs::read(work_dir.join(Self::FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// The `type_url` of our CLI's checkpoint options.
pub const CHECKPOINT_REQUEST_TYPE: &str = "criu-shim.io/CheckpointRequest";

/// What our CLI asks of a checkpoint (JSON in the options `Any`).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct CheckpointRequest {
    /// Archive name or key on the share (default: the checkpoint-to annotation).
    pub to: Option<String>,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub ext_unix_sk: bool,
    /// zstd level; 0 = no compression.
    pub compression_level: Option<i32>,
    /// Every container of the request's pod, frozen together.
    #[serde(default)]
    pub pod: bool,
    /// Publish everything but the memory, which the source serves to the
    /// restoring node (see `checkpoint::post_copy`).
    #[serde(default)]
    pub post_copy: bool,
}

/// What a checkpoint published, for the CLI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointReport {
    pub archives: Vec<ArchiveReport>,
    /// One line per archive, for people.
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchiveReport {
    pub archive: PathBuf,
    pub archive_bytes: u64,
    pub images_bytes: u64,
    pub publish_seconds: f64,
    pub frozen_ms: Option<f64>,
    pub criu_ms: Option<f64>,
}

impl CheckpointReport {
    /// Name of the file in the directory the Checkpoint RPC names.
    pub const FILE: &'static str = "report.json";
}

/// How far a checkpoint is, for the CLI to show while it waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressReport {
    /// `dump` (CRIU writing images) or `publish` (archive to the share).
    pub phase: String,
    /// Bytes of images written (dump) or archived (publish) so far.
    pub done_bytes: u64,
    /// All the images' bytes, once known (publish).
    pub total_bytes: Option<u64>,
}

impl ProgressReport {
    pub const FILE: &'static str = "progress.json";

    /// Replaces the file in `dir` whole (write, then rename), so a reader
    /// never sees half of it.
    pub fn write(&self, dir: &Path) {
        let tmp = dir.join(".progress.json.new");
        if let Ok(json) = serde_json::to_vec(self) {
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join(Self::FILE));
            }
        }
    }

    pub fn read(dir: &Path) -> Option<ProgressReport> {
        std::fs::read(dir.join(Self::FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }
}

/// How a post-copy transfer ended, for a CLI that waits for it
/// (`checkpoint --post-copy --wait`); written once into its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostCopyEnd {
    /// Every page moved and the source exited; else the transfer was
    /// called off and the source runs on.
    pub moved: bool,
    pub bytes: u64,
    pub seconds: f64,
    /// Why it was called off.
    pub why: Option<String>,
}

impl PostCopyEnd {
    pub const FILE: &'static str = "post-copy.json";

    pub fn write(&self, dir: &Path) {
        let tmp = dir.join(".post-copy.json.new");
        if let Ok(json) = serde_json::to_vec(self) {
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join(Self::FILE));
            }
        }
    }

    pub fn read(dir: &Path) -> Option<PostCopyEnd> {
        std::fs::read(dir.join(Self::FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }
}

/// What `shim delete` needs to clean up after a shim that died.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub runc: PathBuf,
    pub runc_root: PathBuf,
}

impl ShimState {
    /// Name of the file in the bundle.
    pub const FILE: &'static str = "criu-shim.json";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_stats_round_trip_with_the_failure_kind() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(FrontStats::read(dir.path()), FrontStats::default());
        let s = FrontStats {
            criu_ms: 12.5,
            frozen_ms: Some(3.0),
            error: Some(FrontFailure {
                kind: FailureKind::Timeout,
                message: "CRIU dump timed out after 1 s".into(),
            }),
        };
        s.write(dir.path());
        assert_eq!(FrontStats::read(dir.path()), s);
        let raw = std::fs::read_to_string(dir.path().join(FrontStats::FILE)).unwrap();
        assert!(raw.contains(r#""kind":"timeout""#), "{raw}");
    }
}
