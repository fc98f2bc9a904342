//! A share on a real network file system: an sshd in a network namespace
//! of its own (a "file server"), its export mounted twice with sshfs over
//! FUSE, once per node. Each mount has its own caches, so one node sees
//! another's new files late, as on NFS or any eventually consistent share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{wait_until, NodeNet};

pub struct SshfsShare {
    pub dir: tempfile::TempDir,
    sshd: Child,
    mounts: Vec<PathBuf>,
    net: NodeNet,
}

impl SshfsShare {
    /// The server, and `n` mounts of its export.
    pub fn start(n: usize) -> SshfsShare {
        Self::start_with(n, None)
    }

    /// The same behind a link whose client-to-server direction (what the
    /// mounts write) is limited to `rate` (tc's syntax: `400mbit` is
    /// 50 MB/s; a token bucket on the host's end of the server's veth):
    /// a slow share, for benchmarks. Reads are not limited.
    pub fn start_throttled(n: usize, rate: &str) -> SshfsShare {
        Self::start_with(n, Some(rate))
    }

    fn start_with(n: usize, rate: Option<&str>) -> SshfsShare {
        let dir = tempfile::Builder::new()
            .prefix("criu-shim-sshfs-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let net = NodeNet::create(&d.join("cni"));
        let server = format!("10.212.{}.2", net.index);
        if let Some(rate) = rate {
            let ok = Command::new("tc")
                .args(["qdisc", "add", "dev", &format!("csh{}", net.index)])
                .args([
                    "root", "tbf", "rate", rate, "burst", "1mb", "latency", "50ms",
                ])
                .status()
                .expect("run tc (hack/setup installs iproute2)")
                .success();
            assert!(ok, "tc could not limit the share's link to {rate}");
        }
        std::fs::create_dir_all(d.join("export")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        for key in ["hostkey", "id"] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .status()
                .expect("ssh-keygen (hack/setup installs openssh-client)")
                .success();
            assert!(ok, "ssh-keygen failed");
        }
        std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).unwrap();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress {server}:22\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
                 Subsystem sftp internal-sftp\n",
                d = d.display()
            ),
        )
        .unwrap();
        let sshd = Command::new("ip")
            .args(["netns", "exec", &format!("criu-shim-n{}", net.index)])
            .arg("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("start sshd (hack/setup installs openssh-server)");
        let mut share = SshfsShare {
            sshd,
            mounts: Vec::new(),
            net,
            dir,
        };
        for i in 0..n {
            share.mount(&server, i);
        }
        share
    }

    fn mount(&mut self, server: &str, i: usize) {
        let d = self.dir.path().to_path_buf();
        let mnt = d.join(format!("mnt-{i}"));
        std::fs::create_dir_all(&mnt).unwrap();
        // Listings stay cached for 2 minutes (sshfs's default is 20 s), so
        // a slow, loaded test machine still sees them stale.
        let opts = format!(
            "IdentityFile={}/id,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,dcache_timeout=120",
            d.display()
        );
        let mut tries = 0;
        wait_until(Duration::from_secs(15), "sshfs to mount", || {
            tries += 1;
            Command::new("sshfs")
                .arg(format!("root@{server}:{}/export", d.display()))
                .arg(&mnt)
                .args(["-o", &opts])
                .stderr(Stdio::null())
                .status()
                .expect("run sshfs (hack/setup installs it)")
                .success()
        });
        assert!(is_sshfs(&mnt), "{} is not an sshfs mount", mnt.display());
        self.mounts.push(mnt);
    }

    /// Where node `i` sees the share.
    /// Cuts the file server off the network (`false`) or brings it back:
    /// reads of the mounts then hang, as over a cut link.
    pub fn link_up(&self, up: bool) {
        let ok = Command::new("ip")
            .args(["link", "set", &format!("csh{}", self.net.index)])
            .arg(if up { "up" } else { "down" })
            .status()
            .expect("run ip")
            .success();
        assert!(ok, "ip link set csh{} failed", self.net.index);
    }

    pub fn mount_point(&self, i: usize) -> &Path {
        &self.mounts[i]
    }

    /// The server's own directory (what every mount shows, eventually).
    pub fn export(&self) -> PathBuf {
        self.dir.path().join("export")
    }
}

fn is_sshfs(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(&format!(" {} ", path.display())) && l.contains("fuse.sshfs"))
}

impl Drop for SshfsShare {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(m)
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}
