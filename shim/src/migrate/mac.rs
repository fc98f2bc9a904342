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

/// Longest key file read (a key is 32+ random bytes; anything this large
/// is not one).
pub const MAX_KEY_BYTES: u64 = 4096;

/// Reads the key file. It must be a regular file (not through a symlink),
/// owned by root, readable by nobody else, and hold 32 to 4096 bytes:
/// whoever can read it can sign archives every node restores.
pub fn load_key(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let fix = format!(
        "every node needs the same key file (for example `head -c 32 /dev/urandom > {p}; \
         chmod 600 {p}`, copied to all nodes), or unset CRIU_SHIM_ARCHIVE_KEY_FILE",
        p = path.display()
    );
    let refuse = |why: String| {
        Error::FailedPrecondition(format!("the archive key {}: {why}; {fix}", path.display()))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| refuse(format!("cannot read it ({e})")))?;
    let meta = file
        .metadata()
        .map_err(|e| refuse(format!("cannot read it ({e})")))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if meta.uid() != 0 {
        return Err(refuse(format!("owned by uid {}, not root", meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refuse(format!(
            "mode {:o} lets group or others read it; chmod 600",
            meta.mode() & 0o777
        )));
    }
    let mut key = Vec::new();
    file.take(MAX_KEY_BYTES + 1)
        .read_to_end(&mut key)
        .map_err(|e| refuse(format!("cannot read it ({e})")))?;
    if key.len() as u64 > MAX_KEY_BYTES {
        return Err(refuse(format!("larger than {MAX_KEY_BYTES} bytes")));
    }
    if key.len() < MIN_KEY_BYTES {
        return Err(refuse(format!(
            "it has {} bytes; use at least {MIN_KEY_BYTES} random bytes",
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
    fn key_files_are_checked_before_use() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let err = load_key(&dir.path().join("none")).unwrap_err();
        assert!(
            err.to_string().contains("every node needs the same key"),
            "{err}"
        );
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let err = load_key(&write("short", b"1234", 0o600)).unwrap_err();
        assert!(err.to_string().contains("at least 32"), "{err}");
        let err = load_key(&write("open", &[7u8; 32], 0o644)).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let err = load_key(&write("big", &[7u8; 8192], 0o600)).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        let good = write("good", &[7u8; 32], 0o600);
        assert_eq!(load_key(&good).unwrap(), vec![7u8; 32]);
        std::os::unix::fs::symlink(&good, dir.path().join("link")).unwrap();
        assert!(load_key(&dir.path().join("link")).is_err());
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
        nix::unistd::chown(&good, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let err = load_key(&good).unwrap_err();
        assert!(err.to_string().contains("not root"), "{err}");
    }
}
