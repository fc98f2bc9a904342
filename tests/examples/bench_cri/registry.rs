//! A read-only OCI distribution registry serving the test images from their
//! OCI archive, just enough for containerd to pull them: containerd's own
//! CRI restore pulls the checkpoint's base image by digest even when it is
//! already on the node, and this machine has no registry to pull from.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

pub struct Registry {
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Serves the images of the OCI archive `oci_tar` at `localhost:PORT`
    /// of the network namespace `netns` (a node's): containerd pulls from
    /// localhost registries over plain HTTP without any configuration.
    pub fn serve(oci_tar: &Path, netns: &Path) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        tar::Archive::new(std::fs::File::open(oci_tar).unwrap())
            .unpack(dir.path())
            .unwrap();
        let ns = std::fs::File::open(netns).unwrap();
        // A listening socket stays in the namespace it was made in.
        let listener = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            TcpListener::bind("127.0.0.1:0").unwrap()
        })
        .join()
        .unwrap();
        let port = listener.local_addr().unwrap().port();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let root = root.clone();
                std::thread::spawn(move || {
                    let _ = answer(stream, &root);
                });
            }
        });
        Registry { port, _dir: dir }
    }
}

/// The manifest digest a tag names, from index.json's ref.name annotations.
fn tag_digest(root: &Path, tag: &str) -> Option<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).ok()?).ok()?;
    index["manifests"]
        .as_array()?
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str().map(str::to_string))
}

fn blob(root: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let path = root.join("blobs/sha256").join(hex);
    path.is_file().then_some(path)
}

fn answer(stream: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head = method == "HEAD";
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /v2/<name, maybe with slashes>/(manifests|blobs)/<reference>
    let tail = match segments.as_slice() {
        ["v2", .., kind, reference] if segments.len() >= 4 => Some((*kind, *reference)),
        _ => None,
    };
    let found = match (segments.as_slice(), tail) {
        (["v2", ""] | ["v2"], _) => Some((b"{}".to_vec(), "application/json", None)),
        (_, Some(("manifests", reference))) => {
            let digest = if reference.starts_with("sha256:") {
                Some(reference.to_string())
            } else {
                tag_digest(root, reference)
            };
            digest.and_then(|d| {
                let bytes = std::fs::read(blob(root, &d)?).ok()?;
                Some((bytes, "application/vnd.oci.image.manifest.v1+json", Some(d)))
            })
        }
        (_, Some(("blobs", digest))) => blob(root, digest).and_then(|p| {
            let bytes = std::fs::read(p).ok()?;
            Some((bytes, "application/octet-stream", Some(digest.to_string())))
        }),
        _ => None,
    };
    let mut out = stream;
    match found {
        Some((body, content_type, digest)) => {
            let mut h = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            if let Some(d) = digest {
                h.push_str(&format!("Docker-Content-Digest: {d}\r\n"));
            }
            h.push_str("\r\n");
            out.write_all(h.as_bytes())?;
            if !head {
                out.write_all(&body)?;
            }
        }
        None => out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
    }
    Ok(())
}
