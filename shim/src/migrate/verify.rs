//! Verification: with a cluster key, the manifest's MAC must verify (see
//! [`super::mac`]); the manifest must be ours and of a version we read, and
//! every member must be listed in it with the same size and SHA-256, with
//! nothing missing and nothing extra. Only then is anything used.

use super::manifest::{Manifest, FORMAT, VERSION};
use super::members;
use super::unpack::Unpacked;
use crate::error::{Error, Result};

pub fn verify(u: &Unpacked, what: &str, mac_key: Option<&[u8]>) -> Result<Manifest> {
    let bad =
        |why: String| Error::InvalidArgument(format!("archive {what} failed verification: {why}"));
    let raw = u
        .manifest
        .as_ref()
        .ok_or_else(|| bad(format!("no {} (truncated archive?)", members::MANIFEST)))?;
    if let Some(key) = mac_key {
        // Before anything in the manifest is believed.
        let Some(mac) = &u.manifest_mac else {
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
    if m.version > VERSION {
        return Err(bad(format!(
            "format version {} is newer than this shim reads ({VERSION}); upgrade criu-shim",
            m.version
        )));
    }
    for member in &m.members {
        match u.members.get(&member.path) {
            None => return Err(bad(format!("{} is missing", member.path))),
            Some((size, sha)) if *size != member.size || *sha != member.sha256 => {
                return Err(bad(format!(
                    "checksum mismatch for {} (the archive is corrupt or was modified)",
                    member.path
                )))
            }
            Some(_) => {}
        }
    }
    for path in u.members.keys() {
        if m.member(path).is_none() {
            return Err(bad(format!("{path} is not in the manifest")));
        }
    }
    let inventory = format!("{}/inventory.img", members::IMAGES_DIR);
    if m.member(&inventory).is_none() {
        return Err(bad("no CRIU images (checkpoint/inventory.img)".into()));
    }
    Ok(m)
}
