//! Memory from the source node (post-copy): the restoring side.
//!
//! A post-copy archive holds every image but the private memory; its
//! signed manifest names the source node's relay and the transfer's
//! session ([`crate::migrate::manifest::PageSourceRef`]). The lazy-pages
//! daemon ([`super::lazy`]) asks this source for pages by task and
//! address, as CRIU's own lazy-pages daemon asks a page server; the
//! relay answers from the frozen source through CRIU
//! ([`crate::checkpoint::post_copy`]). Every answer is checked
//! ([`crate::page_stream`]) before a byte reaches the restored tasks.
//!
//! When the last page is in, [`PageSource::finished`] tells the source,
//! whose dump then ends (the source exits). If the source cannot confirm
//! that, the restored copy is killed: of the two copies, at most one may
//! run, and the source's ends up the one that does.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use criu_sys::memory::{served_memory, TaskMemory};

use super::lazy::{PageSource, Runs};
use crate::error::{Error, Result};
use crate::migrate::manifest::PageSourceRef;
use crate::page_stream::{self, AnswerHead, Request, Stream, MAX_PAGES, PAGE_SIZE};

/// The source node's relay, connected and authenticated.
///
/// One request at a time would leave each side idle while the other
/// works (about 200 MiB/s between two nodes of this project's machines),
/// so the daemon's hint of its next background read is asked for before
/// the current answer is read: the source serves it while this node
/// copies the current one in. Answers come in the order asked.
pub struct RemotePages {
    stream: Stream<TcpStream>,
    peer: SocketAddr,
    /// Requests sent whose answers are still to be read, oldest first.
    outstanding: std::collections::VecDeque<Ask>,
    /// The daemon's next background read, not asked for yet.
    hint: Option<Ask>,
    /// An answer read ahead of its turn (a fault came first), kept for
    /// when it is asked for: the address it starts at and its bytes.
    stash: Option<(Ask, Vec<u8>)>,
}

/// One request: `len` bytes at `vaddr` of task `pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ask {
    pid: u32,
    vaddr: u64,
    len: usize,
}

/// Most requests in flight: the current one and the next.
const IN_FLIGHT: usize = 2;

/// Run sizes for the source node. Answers arrive in the order asked, so
/// a fault waits for the background answer in flight ahead of it, then
/// for its own. Measured here (`hack/bench-cri`, post-copy, 512 MiB):
/// 128 KiB faults behind 1 MiB background runs cost about 0.95 ms each;
/// 32 KiB faults behind 512 KiB runs about 0.5 ms, and B's answers while
/// pages move take half as long. Smaller background runs cost more than
/// they give: CRIU's page server spends about 0.16 ms per request, and
/// 256 KiB runs slowed the whole move by a fifth.
const REMOTE_RUNS: Runs = Runs {
    fault: 32 << 10,
    background: 512 << 10,
};

impl RemotePages {
    /// Connects to the relay `src` names and proves we hold `key`;
    /// `timeout` bounds the connection and every answer after it (a
    /// silent source fails the restore, which kills the copy).
    pub fn connect(src: &PageSourceRef, key: &[u8], timeout: Duration) -> Result<RemotePages> {
        let peer = src.address;
        let refuse = |why: String| {
            Error::FailedPrecondition(format!(
                "the post-copy source {peer} (session {}): {why}",
                src.session
            ))
        };
        let session = page_stream::parse_session(&src.session)
            .ok_or_else(|| refuse("the manifest's session id is malformed".into()))?;
        let tcp = TcpStream::connect_timeout(&peer, timeout).map_err(|e| {
            refuse(format!(
                "cannot connect ({e}); its transfer may have been called off (the source \
                 then runs on), or this node cannot reach its CRIU_SHIM_POST_COPY_ADDRESS"
            ))
        })?;
        tcp.set_nodelay(true)
            .and_then(|()| tcp.set_read_timeout(Some(timeout)))
            .and_then(|()| tcp.set_write_timeout(Some(timeout)))
            .map_err(|e| refuse(format!("socket options: {e}")))?;
        let stream = page_stream::connect(tcp, key, &session).map_err(|e| {
            refuse(format!(
                "{e}; both nodes need the same CRIU_SHIM_ARCHIVE_KEY_FILE, and a transfer \
                 serves one restore"
            ))
        })?;
        log::info!("post-copy: connected to the source {peer}");
        Ok(RemotePages {
            stream,
            peer,
            outstanding: Default::default(),
            hint: None,
            stash: None,
        })
    }

    fn ask(&mut self, a: Ask) -> std::result::Result<(), String> {
        let pages = (a.len / PAGE_SIZE) as u32;
        self.stream
            .request(Request::Get {
                pid: a.pid,
                vaddr: a.vaddr,
                pages,
            })
            .map_err(|e| format!("ask the source {} for pages: {e}", self.peer))?;
        self.outstanding.push_back(a);
        Ok(())
    }

    /// Up to `buf.len()` bytes at `vaddr` of `pid` (an answer may hold
    /// fewer): from the stash, from a request in flight, or asked now;
    /// the hinted next read is asked for before this answer is read.
    fn get(&mut self, pid: u32, vaddr: u64, buf: &mut [u8]) -> std::result::Result<usize, String> {
        let want = Ask {
            pid,
            vaddr,
            len: buf.len(),
        };
        if let Some((a, bytes)) = self.stash.take() {
            if a.pid == pid && a.vaddr == vaddr && bytes.len() <= buf.len() {
                buf[..bytes.len()].copy_from_slice(&bytes);
                return Ok(bytes.len());
            }
            // Still the background's next read, most likely.
            self.stash = Some((a, bytes));
        }
        // Answers to other requests come first: keep the latest one.
        while let Some(front) = self.outstanding.front().copied() {
            if front.pid == pid && front.vaddr == vaddr && front.len <= want.len {
                break;
            }
            let mut bytes = vec![0u8; front.len];
            let n = self.receive(front, &mut bytes)?;
            bytes.truncate(n);
            self.stash = Some((front, bytes));
        }
        if self.outstanding.is_empty() {
            self.ask(want)?;
        }
        if let Some(next) = self.hint.take() {
            if self.outstanding.len() < IN_FLIGHT && next != want {
                self.ask(next)?;
            }
        }
        let front = self.outstanding[0];
        self.receive(front, &mut buf[..front.len])
    }

    /// The answer to the oldest request in flight.
    fn receive(&mut self, a: Ask, buf: &mut [u8]) -> std::result::Result<usize, String> {
        self.outstanding.pop_front();
        let vaddr = a.vaddr;
        match self.stream.read_answer(buf) {
            Ok(AnswerHead::Pages { vaddr: at, len }) if at == vaddr => Ok(len),
            Ok(AnswerHead::Refused(why)) => Err(format!("the source {} refused: {why}", self.peer)),
            Ok(other) => Err(format!(
                "the source {} answered {other:?} to a request for {vaddr:#x}",
                self.peer
            )),
            Err(e) => Err(format!("the source {}: {e}", self.peer)),
        }
    }
}

impl PageSource for RemotePages {
    /// The runs the source's dump left to its page server; offsets are
    /// the source's addresses (which a remap here does not change).
    fn memory(&self, images: &Path, pid: u32) -> std::result::Result<TaskMemory, String> {
        let mut m = served_memory(images, pid).map_err(|e| e.to_string())?;
        for r in &mut m.ranges {
            r.offset = r.start;
        }
        Ok(m)
    }

    fn read(
        &mut self,
        pid: u32,
        _pages_id: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), String> {
        let mut at = 0;
        while at < buf.len() {
            let want = (buf.len() - at).min(MAX_PAGES as usize * PAGE_SIZE);
            at += self.get(pid, offset + at as u64, &mut buf[at..at + want])?;
        }
        Ok(())
    }

    fn runs(&self) -> Runs {
        REMOTE_RUNS
    }

    fn hint_next(&mut self, pid: u32, _pages_id: u32, offset: u64, len: u64) {
        let len = (len as usize).min(MAX_PAGES as usize * PAGE_SIZE);
        self.hint = (len > 0).then_some(Ask {
            pid,
            vaddr: offset,
            len,
        });
    }

    fn finished(&mut self) -> std::result::Result<(), String> {
        while let Some(front) = self.outstanding.front().copied() {
            self.receive(front, &mut vec![0u8; front.len])?;
        }
        let ended = self
            .stream
            .request(Request::Done)
            .map_err(|e| e.to_string())
            .and_then(|()| self.stream.read_answer(&mut []).map_err(|e| e.to_string()));
        match ended {
            Ok(AnswerHead::Finished) => {
                log::info!(
                    "post-copy: every page moved; the source {} ended its dump",
                    self.peer
                );
                Ok(())
            }
            Ok(other) => Err(format!(
                "the source {} could not end its dump ({other:?}); it runs on",
                self.peer
            )),
            Err(e) => Err(format!(
                "the source {} did not confirm the end of its dump: {e}",
                self.peer
            )),
        }
    }
}
