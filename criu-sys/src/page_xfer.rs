//! CRIU's page-server protocol, as the side that asks for pages speaks it
//! to a lazy dump.
//!
//! Post-copy migration from the source node: `criu dump --lazy-pages`
//! (RPC: `lazy_pages`, with `ps` naming an address and port) writes every
//! image but the private anonymous memory, keeps those pages in its page
//! pipes with the tree frozen, and listens as a page server. Whoever serves
//! the restored tasks' faults connects and asks for pages (page-xfer.c,
//! `page_server_serve`). Every message starts with a fixed header in the
//! host's byte order; CRIU 4.x made the page count 64-bit, so the header is
//! 32 bytes: `u32 cmd`, 4 bytes of padding, `u64 nr_pages`, `u64 vaddr`,
//! `u64 dst_id` (verified against CRIU 4.2.1: the 24-byte header of CRIU 3
//! leaves it waiting for the rest).
//! - [`Request::Get`]: `GET` (7), `dst_id` the task's pid in the images.
//!   The answer is `ADD_F` (6) with `PE_PRESENT` in the command's upper 16
//!   bits, the same address and pid, the number of pages that follow (up
//!   to the end of the run CRIU holds them in, so possibly fewer than
//!   asked), then their bytes. The same pages can be asked for again.
//! - [`Request::FlushAndClose`]: `FLUSH_N_CLOSE` (0x1024): the transfer is
//!   over. CRIU answers with a 4-byte status (0: fine) and ends its dump,
//!   which, without `leave_running`, kills the tree.
//!
//! There is no message to call the transfer off, and a connection that
//! closes without `FLUSH_N_CLOSE` ends the dump as if the transfer had
//! succeeded (seen with 4.2.1), killing the tree with pages nobody has.
//! A command CRIU does not know fails the session instead: the dump fails
//! and CRIU thaws the tree, so the source runs on. [`PageClient`] sends
//! that ([`ABORT`]) when it is dropped without [`PageClient::finish`]. CRIU trusts its peer: a `GET` for a
//! pid that is not in the tree crashes it (a NULL dereference, seen with
//! 4.2.1), and one for pages it does not hold lazily ends the session. Ask
//! only for runs that the dump's own pagemap flags lazy ([`crate::memory`]).
//!
//! Serving a `GET` needs a pipe larger than `fs.pipe-max-size`'s default
//! (1 MiB); root without CAP_SYS_RESOURCE cannot get one, and CRIU 4.2.1
//! then fails the transfer ([`pipe_max_size_suffices`]).

use std::io::{self, Read, Write};

/// Bytes per page on the machines CRIU runs on here.
pub const PAGE_SIZE: usize = 4096;
/// The smallest `fs.pipe-max-size` with which CRIU 4.2.1 serves pages
/// without CAP_SYS_RESOURCE (it sizes its pipe to about 3.2 MiB).
pub const PIPE_MAX_SIZE_NEEDED: u64 = 4 << 20;

const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_FLUSH_N_CLOSE: u32 = 0x1024;
/// No command of CRIU's: it fails the session (see the module's docs).
pub const ABORT: u32 = 0xdead;
/// Pagemap flag carried in an answer's command (`cmd >> 16`).
const PE_PRESENT: u32 = 1 << 2;
const HEADER_LEN: usize = 32;

/// What the asking side sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Get { pid: u32, vaddr: u64, pages: u64 },
    FlushAndClose,
    Abort,
}

/// One header as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    cmd: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.cmd.to_ne_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_ne_bytes(x)
        };
        Header {
            cmd: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }
}

impl Request {
    fn header(&self) -> Header {
        match *self {
            Request::Get { pid, vaddr, pages } => Header {
                cmd: PS_IOV_GET,
                nr_pages: pages,
                vaddr,
                dst_id: u64::from(pid),
            },
            Request::FlushAndClose => Header {
                cmd: PS_IOV_FLUSH_N_CLOSE,
                nr_pages: 0,
                vaddr: 0,
                dst_id: 0,
            },
            Request::Abort => Header {
                cmd: ABORT,
                nr_pages: 0,
                vaddr: 0,
                dst_id: 0,
            },
        }
    }
}

/// A connection to a lazy dump's page server. Dropped without
/// [`PageClient::finish`], it calls the transfer off: the dump fails and
/// the source runs on.
pub struct PageClient<S: Write> {
    stream: S,
    finished: bool,
}

impl<S: Read + Write> PageClient<S> {
    pub fn new(stream: S) -> PageClient<S> {
        PageClient {
            stream,
            finished: false,
        }
    }

    /// Asks for the pages at `vaddr` of task `pid` (as many as `buf` holds,
    /// a whole number of pages) and reads them into the front of `buf`.
    /// Returns how many bytes came: CRIU stops at the end of the run it
    /// holds them in, so fewer than asked is an answer, not an error.
    pub fn get(&mut self, pid: u32, vaddr: u64, buf: &mut [u8]) -> io::Result<usize> {
        let pages = (buf.len() / PAGE_SIZE) as u64;
        if pages == 0
            || !buf.len().is_multiple_of(PAGE_SIZE)
            || !vaddr.is_multiple_of(PAGE_SIZE as u64)
        {
            return Err(invalid(format!(
                "a page request must be whole pages at a page boundary ({vaddr:#x}, {} bytes)",
                buf.len()
            )));
        }
        self.send(Request::Get { pid, vaddr, pages })?;
        let h = self.receive()?;
        let expected = PS_IOV_ADD_F | (PE_PRESENT << 16);
        if h.cmd != expected
            || h.vaddr != vaddr
            || h.dst_id != u64::from(pid)
            || h.nr_pages == 0
            || h.nr_pages > pages
        {
            return Err(invalid(format!(
                "the page server answered {h:?} to a request for {pages} pages of pid {pid} at \
                 {vaddr:#x}"
            )));
        }
        let n = h.nr_pages as usize * PAGE_SIZE;
        self.stream.read_exact(&mut buf[..n])?;
        Ok(n)
    }

    /// Ends the transfer: CRIU finishes its dump. Errors if it reports a
    /// failure.
    pub fn finish(mut self) -> io::Result<()> {
        self.finished = true;
        self.send(Request::FlushAndClose)?;
        let mut status = [0u8; 4];
        self.stream.read_exact(&mut status)?;
        match i32::from_ne_bytes(status) {
            0 => Ok(()),
            s => Err(io::Error::other(format!(
                "the page server ended the transfer with status {s}"
            ))),
        }
    }

    fn send(&mut self, r: Request) -> io::Result<()> {
        self.stream.write_all(&r.header().encode())
    }

    fn receive(&mut self) -> io::Result<Header> {
        let mut b = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut b)?;
        Ok(Header::decode(&b))
    }
}

/// Whether this node's `fs.pipe-max-size` lets CRIU serve pages (see the
/// module's docs); the value read, for a message.
pub fn pipe_max_size_suffices() -> io::Result<(bool, u64)> {
    let v: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")?
        .trim()
        .parse()
        .map_err(|e| invalid(format!("fs.pipe-max-size: {e}")))?;
    Ok((v >= PIPE_MAX_SIZE_NEEDED, v))
}

impl<S: Write> Drop for PageClient<S> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.stream.write_all(&Request::Abort.header().encode());
        }
    }
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A page server that answers one GET with `reply` and `pages` pages of
    /// `fill`, then a FLUSH_N_CLOSE with status 0.
    fn server(mut s: UnixStream, reply: impl Fn(Header) -> Header, fill: u8) -> Header {
        let mut b = [0u8; HEADER_LEN];
        s.read_exact(&mut b).unwrap();
        let asked = Header::decode(&b);
        let r = reply(asked);
        // A client that refuses the answer hangs up: write errors are fine.
        let _ = s.write_all(&r.encode());
        let _ = s.write_all(&vec![fill; r.nr_pages as usize * PAGE_SIZE]);
        if s.read_exact(&mut b).is_ok() && Header::decode(&b).cmd == PS_IOV_FLUSH_N_CLOSE {
            s.write_all(&0i32.to_ne_bytes()).unwrap();
        }
        asked
    }

    #[test]
    fn a_get_is_answered_with_as_many_pages_as_the_run_holds() {
        let (a, b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || {
            server(
                b,
                |h| Header {
                    cmd: PS_IOV_ADD_F | (PE_PRESENT << 16),
                    nr_pages: 2,
                    ..h
                },
                7,
            )
        });
        let mut c = PageClient::new(a);
        let mut buf = vec![0u8; 4 * PAGE_SIZE];
        let n = c.get(42, 0x7f00_0000_0000, &mut buf).unwrap();
        assert_eq!(n, 2 * PAGE_SIZE);
        assert!(buf[..n].iter().all(|&x| x == 7));
        c.finish().unwrap();
        let asked = srv.join().unwrap();
        assert_eq!(
            asked,
            Header {
                cmd: PS_IOV_GET,
                nr_pages: 4,
                vaddr: 0x7f00_0000_0000,
                dst_id: 42
            }
        );
    }

    #[test]
    fn a_client_dropped_unfinished_calls_the_transfer_off() {
        let (a, mut b) = UnixStream::pair().unwrap();
        drop(PageClient::new(a));
        let mut h = [0u8; HEADER_LEN];
        b.read_exact(&mut h).unwrap();
        assert_eq!(Header::decode(&h).cmd, ABORT);
    }

    #[test]
    fn answers_that_are_not_the_pages_asked_for_are_errors() {
        let wrong: [fn(Header) -> Header; 4] = [
            |h| Header { cmd: 1, ..h },
            |h| Header {
                vaddr: h.vaddr + 4096,
                cmd: PS_IOV_ADD_F | (PE_PRESENT << 16),
                ..h
            },
            |h| Header {
                nr_pages: h.nr_pages + 1,
                cmd: PS_IOV_ADD_F | (PE_PRESENT << 16),
                ..h
            },
            |h| Header {
                dst_id: 7,
                cmd: PS_IOV_ADD_F | (PE_PRESENT << 16),
                ..h
            },
        ];
        for reply in wrong {
            let (a, b) = UnixStream::pair().unwrap();
            let srv = std::thread::spawn(move || server(b, reply, 1));
            let mut c = PageClient::new(a);
            let mut buf = vec![0u8; PAGE_SIZE];
            let err = c.get(42, 0x1000, &mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            drop(c);
            srv.join().unwrap();
        }
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = PageClient::new(a);
        assert!(c.get(1, 0x1001, &mut [0u8; PAGE_SIZE]).is_err());
        assert!(c.get(1, 0x1000, &mut [0u8; 100]).is_err());
    }
}
