//! Archives signed with the cluster's key.
//!
//! Every member's SHA-256 is in the manifest, but the manifest travels
//! inside the archive: digests catch damage, not tampering. Whoever can
//! write to the share could build an archive whose digests all match, and
//! the shim (root on every node) would restore its processes. With a key
//! that only the nodes hold (`CRIU_SHIM_ARCHIVE_KEY_FILE`), each archive
//! carries an HMAC-SHA256 of its manifest as its last member, and restores
//! refuse any archive whose MAC does not verify under that key.

use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// Shortest key accepted (bytes): the hash's own size.
pub const MIN_KEY_BYTES: usize = 32;

/// Reads the key file; it must exist, be readable and long enough.
pub fn load_key(path: &Path) -> Result<Vec<u8>> {
    let key = std::fs::read(path).map_err(|e| {
        Error::FailedPrecondition(format!(
            "cannot read the archive key {} ({e}); every node needs the same key file \
             (for example `head -c 32 /dev/urandom > {}`, copied to all nodes), \
             or unset CRIU_SHIM_ARCHIVE_KEY_FILE",
            path.display(),
            path.display()
        ))
    })?;
    if key.len() < MIN_KEY_BYTES {
        return Err(Error::FailedPrecondition(format!(
            "the archive key {} has {} bytes; use at least {MIN_KEY_BYTES} random bytes",
            path.display(),
            key.len()
        )));
    }
    Ok(key)
}

/// The key of a configured key file, if any.
pub fn configured(path: Option<&Path>) -> Result<Option<Vec<u8>>> {
    path.map(load_key).transpose()
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any size")
}

/// The hex MAC of `manifest` under `key`.
pub fn sign(key: &[u8], manifest: &[u8]) -> String {
    let mut m = mac(key);
    m.update(manifest);
    super::archive::hex(&m.finalize().into_bytes())
}

/// Whether `mac_hex` is `manifest`'s MAC under `key` (compared in constant time).
pub fn verifies(key: &[u8], manifest: &[u8], mac_hex: &[u8]) -> bool {
    let Some(tag) = unhex(mac_hex) else {
        return false;
    };
    let mut m = mac(key);
    m.update(manifest);
    m.verify_slice(&tag).is_ok()
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    let s = std::str::from_utf8(s).ok()?.trim();
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_verifies_only_under_its_key_and_for_its_manifest() {
        let key = [7u8; 32];
        let mac = sign(&key, b"manifest");
        assert!(verifies(&key, b"manifest", mac.as_bytes()));
        assert!(!verifies(&[8u8; 32], b"manifest", mac.as_bytes()));
        assert!(!verifies(&key, b"manifest, edited", mac.as_bytes()));
        assert!(!verifies(&key, b"manifest", b"not hex"));
        assert!(!verifies(&key, b"manifest", b""));
    }

    #[test]
    fn short_or_missing_keys_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_key(&dir.path().join("none")).unwrap_err();
        assert!(
            err.to_string().contains("every node needs the same key"),
            "{err}"
        );
        std::fs::write(dir.path().join("short"), b"1234").unwrap();
        let err = load_key(&dir.path().join("short")).unwrap_err();
        assert!(err.to_string().contains("at least 32"), "{err}");
    }
}
