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
//! | [`PostCopyEnd`] | the shim's relay, once | our CLI (`--post-copy --wait`) | a file beside the report |
//!
//! The file-borne ones share [`FileMessage`]: written whole, read
//! leniently.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A message passed as a JSON file in a directory both sides know.
/// Written whole (to a hidden name, then renamed: a reader never sees
/// half of one, even of a file rewritten while it is read); read as
/// absent when missing or unreadable, since the writer may have died.
pub trait FileMessage: Serialize + DeserializeOwned {
    /// The file's name in the directory.
    const FILE: &'static str;

    fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!(".{}.new", Self::FILE));
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, dir.join(Self::FILE))
    }

    fn read(dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(dir.join(Self::FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

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

/// In runc's work directory.
impl FileMessage for FrontStats {
    const FILE: &'static str = "criu-shim-front.json";
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

/// In the directory the Checkpoint RPC names.
impl FileMessage for CheckpointReport {
    const FILE: &'static str = "report.json";
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

/// Beside the report, rewritten as the checkpoint goes.
impl FileMessage for ProgressReport {
    const FILE: &'static str = "progress.json";
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

/// Beside the report, once.
impl FileMessage for PostCopyEnd {
    const FILE: &'static str = "post-copy.json";
}

/// What `shim delete` needs to clean up after a shim that died.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub runc: PathBuf,
    pub runc_root: PathBuf,
}

/// In the bundle.
impl FileMessage for ShimState {
    const FILE: &'static str = "criu-shim.json";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_stats_round_trip_with_the_failure_kind() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(FrontStats::read(dir.path()), None);
        let s = FrontStats {
            criu_ms: 12.5,
            frozen_ms: Some(3.0),
            error: Some(FrontFailure {
                kind: FailureKind::Timeout,
                message: "CRIU dump timed out after 1 s".into(),
            }),
        };
        s.write(dir.path()).unwrap();
        assert_eq!(FrontStats::read(dir.path()), Some(s));
        let raw = std::fs::read_to_string(dir.path().join(FrontStats::FILE)).unwrap();
        assert!(raw.contains(r#""kind":"timeout""#), "{raw}");
    }

    #[test]
    fn a_message_is_replaced_whole_and_a_damaged_one_reads_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let at = |done_bytes| ProgressReport {
            phase: "publish".into(),
            done_bytes,
            total_bytes: Some(10),
        };
        at(1).write(dir.path()).unwrap();
        at(2).write(dir.path()).unwrap();
        assert_eq!(ProgressReport::read(dir.path()), Some(at(2)));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [ProgressReport::FILE], "no temporary file left");
        std::fs::write(dir.path().join(ProgressReport::FILE), b"{\"phase\":").unwrap();
        assert_eq!(ProgressReport::read(dir.path()), None);
    }
}
