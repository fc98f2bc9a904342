//! Following CRIU's page images while the dump still writes them.
//!
//! Memory pages are nearly all of a checkpoint's bytes. Archived after the
//! dump, they cost a second pass (read, hash, write to the share) while
//! the source stays stopped. Read while CRIU writes them (from the page
//! cache), most of that pass overlaps the dump, and the archive is on the
//! share shortly after CRIU finishes.
//!
//! CRIU writes each `pages-N.img` once, sequentially, and closes it before
//! it starts the next task's. A followed image is complete when inotify
//! reports it closed after writing, or when the dump has ended, whichever
//! comes first. The dumping thread reports its end through a [`DumpEnd`].

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::error::{Error, Result};

/// How the dump ended, as the dumping thread tells the follower.
#[derive(Debug, Clone)]
pub enum DumpEnd {
    Done {
        frozen_ms: Option<f64>,
        criu_ms: Option<f64>,
        criu_version: String,
    },
    Failed(String),
}

pub struct Follow {
    dir: PathBuf,
    inotify: Inotify,
    end: Receiver<DumpEnd>,
    ended: Option<DumpEnd>,
    /// Page images seen, in creation order, not yet handed out.
    created: VecDeque<String>,
    closed: HashSet<String>,
    /// Page images handed out (archived while following).
    followed: HashSet<String>,
    /// Open them writable too (the archive writer punches them out).
    writable: bool,
}

/// How long to wait for CRIU between looks (inotify wakes us earlier).
const WAIT_MS: u8 = 50;

fn is_page_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

impl Follow {
    /// Watches `images` (created if missing) for the page images of the
    /// dump that will report its end on `end`.
    /// With `writable`, images are opened for writing too, so that the
    /// archive writer may punch out what it has archived (our staging's
    /// images, not a directory containerd will read).
    pub fn new(images: &Path, end: Receiver<DumpEnd>, writable: bool) -> Result<Follow> {
        std::fs::create_dir_all(images)
            .map_err(|e| Error::io(format!("create {}", images.display()), e))?;
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .map_err(|e| Error::io("inotify", e.into()))?;
        inotify
            .add_watch(
                images,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE,
            )
            .map_err(|e| Error::io(format!("watch {}", images.display()), e.into()))?;
        let mut f = Follow {
            dir: images.to_path_buf(),
            inotify,
            end,
            ended: None,
            created: VecDeque::new(),
            closed: HashSet::new(),
            followed: HashSet::new(),
            writable,
        };
        // Images that existed before the watch (none for a fresh dump).
        let mut existing: Vec<String> = std::fs::read_dir(images)
            .map_err(|e| Error::io(format!("read {}", images.display()), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_page_image(n))
            .collect();
        existing.sort();
        f.created.extend(existing);
        Ok(f)
    }

    /// The next page image to archive while the dump runs, opened; `None`
    /// once the dump has ended (the rest is archived as complete files).
    pub fn next_image(&mut self) -> Result<Option<(String, File)>> {
        loop {
            if self.ended.is_some() {
                return Ok(None);
            }
            if let Some(name) = self.created.pop_front() {
                if !self.followed.insert(name.clone()) {
                    continue;
                }
                let path = self.dir.join(&name);
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(self.writable)
                    .open(&path)
                    .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
                return Ok(Some((name, file)));
            }
            self.wait()?;
        }
    }

    /// After reading `name` up to its current end: waits for CRIU to write
    /// more. False once it never will (closed, or the dump has ended): one
    /// last read to the end then has all of it.
    pub fn may_grow(&mut self, name: &str) -> Result<bool> {
        if self.closed.contains(name) || self.ended.is_some() {
            return Ok(false);
        }
        self.wait()?;
        Ok(true)
    }

    /// Page images archived while following.
    pub fn followed(&self) -> &HashSet<String> {
        &self.followed
    }

    /// Waits for the dump to end and says how.
    pub fn end(mut self) -> DumpEnd {
        while self.ended.is_none() {
            match self.end.recv() {
                Ok(e) => self.ended = Some(e),
                Err(_) => self.ended = Some(DumpEnd::Failed("the dump stopped".into())),
            }
        }
        self.ended.take().expect("set above")
    }

    /// Up to [`WAIT_MS`] for an inotify event, then takes in what happened.
    fn wait(&mut self) -> Result<()> {
        match self.end.try_recv() {
            Ok(e) => self.ended = Some(e),
            Err(TryRecvError::Disconnected) => {
                self.ended = Some(DumpEnd::Failed("the dump stopped".into()))
            }
            Err(TryRecvError::Empty) => {}
        }
        if self.ended.is_some() {
            return Ok(());
        }
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(WAIT_MS)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::io("wait for CRIU's images", e.into())),
        }
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(e) => return Err(Error::io("read inotify events", e.into())),
            };
            for ev in events {
                let Some(name) = ev.name.and_then(|n| n.into_string().ok()) else {
                    continue;
                };
                if !is_page_image(&name) {
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_CREATE) {
                    self.created.push_back(name.clone());
                }
                if ev.mask.contains(AddWatchFlags::IN_CLOSE_WRITE) {
                    self.closed.insert(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::mpsc::sync_channel;

    /// Reads `name` the way the archive writer does: to the current end,
    /// then waits, until the follower says it is complete.
    fn read_followed(f: &mut Follow, name: &str, mut file: File) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            file.read_to_end(&mut out).unwrap();
            if !f.may_grow(name).unwrap() {
                file.read_to_end(&mut out).unwrap();
                return out;
            }
        }
    }

    #[test]
    fn page_images_are_followed_as_they_are_written_until_closed_or_the_dump_ends() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("checkpoint");
        let (tx, rx) = sync_channel(1);
        let mut f = Follow::new(&images, rx, false).unwrap();
        let writer_dir = images.clone();
        let criu = std::thread::spawn(move || {
            // pages-1: written in pieces, then closed.
            let mut p1 = File::create(writer_dir.join("pages-1.img")).unwrap();
            for i in 0..5u8 {
                p1.write_all(&[i; 4096]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
            drop(p1);
            std::fs::write(writer_dir.join("core-1.img"), b"not followed").unwrap();
            // pages-2: still open when the dump ends.
            let mut p2 = File::create(writer_dir.join("pages-2.img")).unwrap();
            p2.write_all(&[9; 100]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            p2.write_all(&[8; 100]).unwrap();
            tx.send(DumpEnd::Done {
                frozen_ms: Some(1.0),
                criu_ms: Some(2.0),
                criu_version: "4.2.1".into(),
            })
            .unwrap();
            p2
        });
        let (name, file) = f.next_image().unwrap().unwrap();
        assert_eq!(name, "pages-1.img");
        let one = read_followed(&mut f, &name, file);
        assert_eq!(one.len(), 5 * 4096);
        assert!(one[4 * 4096..].iter().all(|b| *b == 4));
        let mut rest = Vec::new();
        while let Some((name, file)) = f.next_image().unwrap() {
            rest.push((name.clone(), read_followed(&mut f, &name, file)));
        }
        let _p2 = criu.join().unwrap();
        // pages-2 was either followed to its end or left for afterwards.
        for (name, bytes) in &rest {
            assert_eq!(name, "pages-2.img");
            assert_eq!(bytes.len(), 200);
        }
        assert!(!f.followed().contains("core-1.img"));
        assert!(matches!(f.end(), DumpEnd::Done { .. }));
    }

    #[test]
    fn a_failed_dump_ends_the_following() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = sync_channel(1);
        let mut f = Follow::new(dir.path(), rx, false).unwrap();
        tx.send(DumpEnd::Failed("CRIU said no".into())).unwrap();
        assert!(f.next_image().unwrap().is_none());
        assert!(matches!(f.end(), DumpEnd::Failed(e) if e == "CRIU said no"));
    }
}
