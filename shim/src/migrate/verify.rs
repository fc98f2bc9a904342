//! Verification, before anything is written: with a cluster key, the
//! manifest's MAC must verify (see [`super::mac`]); the manifest must be
//! ours, of a version we read, and list only members of our format, each
//! once, within the limits. The result, [`Expected`], is what
//! [`super::unpack`] holds every member to as it streams in: listed, of
//! the declared size, with the declared SHA-256 (or, in format 3, within
//! frames whose digests the frame table holds), and nothing missing.

use std::collections::HashMap;

use super::manifest::{Manifest, FORMAT, NEWEST, VERSION_POST_COPY};
use super::members;
use super::unpack::{Limits, Trailer};
use crate::error::{Error, Result};

/// An authenticated manifest, indexed by member path.
#[derive(Debug)]
pub struct Expected {
    pub manifest: Manifest,
    /// The manifest's exact bytes (the stream must carry the same).
    pub raw: Vec<u8>,
    by_path: HashMap<String, (u64, Option<String>)>,
}

impl Expected {
    /// Size and SHA-256 of `path`, if listed (no SHA-256: the frame table
    /// covers it).
    pub fn member(&self, path: &str) -> Option<(u64, Option<&str>)> {
        self.by_path.get(path).map(|(s, h)| (*s, h.as_deref()))
    }

    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.by_path.keys()
    }

    pub fn total_bytes(&self) -> u64 {
        self.manifest.total_size()
    }
}

pub fn authenticate(
    t: &Trailer,
    what: &str,
    key: Option<&[u8]>,
    limits: &Limits,
) -> Result<Expected> {
    let bad =
        |why: String| Error::InvalidArgument(format!("archive {what} failed verification: {why}"));
    let raw = t
        .manifest
        .as_ref()
        .ok_or_else(|| bad(format!("no {} (truncated archive?)", members::MANIFEST)))?;
    if let Some(key) = key {
        // Before anything in the manifest is believed.
        let Some(mac) = &t.mac else {
            return Err(bad(
                "it is not signed, and this node only restores archives signed with the \
                 cluster's key (CRIU_SHIM_ARCHIVE_KEY_FILE)"
                    .into(),
            ));
        };
        if !super::mac::verifies(key, raw, mac) {
            return Err(bad(
                "its signature does not verify: it was signed with another key, or modified \
                 (every node needs the same CRIU_SHIM_ARCHIVE_KEY_FILE)"
                    .into(),
            ));
        }
    }
    let m: Manifest =
        serde_json::from_slice(raw).map_err(|e| bad(format!("unreadable manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(format!(
            "not a criu-shim checkpoint (format {:?})",
            m.format
        )));
    }
    if m.version > NEWEST {
        return Err(bad(format!(
            "format version {} is newer than this shim reads ({NEWEST}); upgrade criu-shim",
            m.version
        )));
    }
    if (m.version == VERSION_POST_COPY) != m.page_source.is_some() {
        return Err(bad(format!(
            "format version {} {} a page source: only post-copy checkpoints (version \
             {VERSION_POST_COPY}) have one",
            m.version,
            if m.page_source.is_some() {
                "with"
            } else {
                "without"
            }
        )));
    }
    if m.members.len() > limits.max_members {
        return Err(bad(format!(
            "{} members, more than the limit of {}",
            m.members.len(),
            limits.max_members
        )));
    }
    let mut by_path = HashMap::with_capacity(m.members.len());
    let mut total = 0u64;
    for member in &m.members {
        check_member_path(&member.path)
            .map_err(|why| bad(format!("member {:?} refused: {why}", member.path)))?;
        if member.size > limits.max_member_bytes {
            return Err(bad(format!(
                "member {} declares {} bytes, more than the limit of {}",
                member.path, member.size, limits.max_member_bytes
            )));
        }
        if member.sha256.is_none() && (m.version < 3 || m.frames.is_empty()) {
            return Err(bad(format!(
                "member {} has no digest and no frame table covers it",
                member.path
            )));
        }
        total = total.saturating_add(member.size);
        if by_path
            .insert(member.path.clone(), (member.size, member.sha256.clone()))
            .is_some()
        {
            return Err(bad(format!("member {} listed twice", member.path)));
        }
    }
    if total > limits.max_total_bytes {
        return Err(bad(format!(
            "it declares {total} bytes, more than the limit of {}",
            limits.max_total_bytes
        )));
    }
    let inventory = format!("{}/inventory.img", members::IMAGES_DIR);
    if !by_path.contains_key(&inventory) {
        return Err(bad("no CRIU images (checkpoint/inventory.img)".into()));
    }
    Ok(Expected {
        manifest: m,
        raw: raw.clone(),
        by_path,
    })
}

/// Our format's paths only: `checkpoint/<file>` or a known top-level
/// member (not the manifest and its MAC, which the manifest cannot list).
pub fn check_member_path(name: &str) -> std::result::Result<(), &'static str> {
    let top_level = [
        members::SPEC,
        members::CONFIG,
        members::ROOTFS_DIFF,
        members::DELETED,
        members::STATS,
        members::DUMP_LOG,
    ];
    if top_level.contains(&name) {
        return Ok(());
    }
    match name.split_once('/') {
        Some((dir, file))
            if dir == members::IMAGES_DIR
                && !file.is_empty()
                && !file.contains('/')
                && !file.contains('\0')
                && file != "."
                && file != ".." =>
        {
            Ok(())
        }
        _ if name.starts_with('/') => Err("absolute path"),
        _ if name.split('/').any(|c| c == "..") => Err("path traversal ('..')"),
        _ => Err("not a member of the checkpoint format"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only format 4 names a page source, and format 4 always does: a
    /// post-copy archive passed off as a cold one (or the reverse) would
    /// restore a process without its memory.
    #[test]
    fn a_page_source_goes_with_format_4_only() {
        let limits = Limits::from_config(&criu_shim_config::ShimConfig::defaults("default"));
        let source = r#""page_source":{"address":"10.0.0.5:7300","session":"00112233445566778899aabbccddeeff"}"#;
        let manifest = |version: u32, extra: &str| {
            let raw = format!(
                r#"{{"format":"{FORMAT}","version":{version},"container_id":"c","created":0,
                "criu_version":"","kernel":"","shim_version":"","compression":"zstd",
                "tcp_established":false,"stats":{{"frozen_ms":null,"criu_ms":null,
                "pages_bytes":0}},"members":[{{"path":"checkpoint/inventory.img","size":1,
                "sha256":"00"}}]{extra}}}"#
            );
            Trailer {
                manifest: Some(raw.into_bytes()),
                mac: None,
            }
        };
        let check = |t: Trailer| authenticate(&t, "a.tar.zst", None, &limits).map(drop);
        let ok = check(manifest(3, ""));
        assert!(ok.is_ok(), "{:?}", ok.err());
        let ok = check(manifest(4, &format!(",{source}")));
        assert!(ok.is_ok(), "{:?}", ok.err());
        for (version, extra) in [(3, format!(",{source}")), (4, String::new())] {
            let e = check(manifest(version, &extra)).unwrap_err().to_string();
            assert!(e.contains("page source"), "{version}: {e}");
        }
        let e = check(manifest(5, "")).unwrap_err().to_string();
        assert!(e.contains("upgrade criu-shim"), "{e}");
    }

    #[test]
    fn member_paths_are_our_format_only() {
        for ok in ["checkpoint/core-1.img", "spec.dump", "rootfs-diff.tar"] {
            assert!(check_member_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "checkpoint/../../x",
            "checkpoint/a/b",
            "checkpoint/",
            "checkpoint/..",
            "other/file",
            "etc/cron.d/x",
            "manifest.json",
        ] {
            assert!(check_member_path(bad).is_err(), "{bad}");
        }
    }
}
