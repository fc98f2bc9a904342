//! The page stream: post-copy memory from the source node's shim to the
//! restoring node's, over TCP between node addresses.
//!
//! Pages are secrets (keys, tokens, a tenant's data), and the restoring
//! node trusts every byte it copies into a process. Both ends hold the
//! cluster key (`CRIU_SHIM_ARCHIVE_KEY_FILE`), so:
//! - a handshake proves each side holds it (a MAC over a fresh nonce from
//!   each side and the checkpoint's session id, named in the signed
//!   manifest), and derives a key for this connection alone;
//! - every message after it carries a keyed BLAKE3 MAC over its direction,
//!   its sequence number and its bytes: a message changed, dropped,
//!   replayed or moved to another connection fails the next check.
//!
//! Authenticated, not encrypted: page traffic belongs on the node network
//! (or a WireGuard/IPsec tunnel where that network is shared).
//!
//! Messages are typed ([`Request`], [`Answer`]) and bounded: a peer cannot
//! make the other side allocate more than [`MAX_PAGES`] pages or a
//! [`MAX_TEXT`]-byte message.

use std::io::{self, Read, Write};

/// Identifies the protocol and its version in the first message.
const MAGIC: &[u8; 8] = b"CSPAGES1";
/// Context string of the key derivation (BLAKE3's `derive_key`).
const CONTEXT: &str = "criu-shim 2026 page stream v1";
/// Most pages one request may ask for (4 MiB).
pub const MAX_PAGES: u32 = 1024;
pub const PAGE_SIZE: usize = 4096;
/// Longest error text an answer may carry.
pub const MAX_TEXT: usize = 4096;
const MAC_LEN: usize = 32;

/// A checkpoint's session id: names one transfer, in the manifest.
pub type SessionId = [u8; 16];

/// The restoring node's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `pages` pages at `vaddr` of task `pid` (its pid in the images).
    Get { pid: u32, vaddr: u64, pages: u32 },
    /// Every page is in place: end the dump (the source exits).
    Done,
}

/// The source node's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<'a> {
    /// Pages at `vaddr`, possibly fewer than asked (whole pages).
    Pages { vaddr: u64, bytes: &'a [u8] },
    /// The dump ended: the source is gone, its memory is the restorer's.
    Finished,
    /// The request was refused or failed; the transfer is over.
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer does not hold the cluster key (its proof does not verify)")]
    NotAuthenticated,
    #[error("the peer is not a criu-shim page stream (or another version of it)")]
    NotOurs,
    #[error("a message failed its MAC: changed, replayed or injected on the way")]
    BadMac,
    #[error("a malformed message: {0}")]
    Malformed(String),
}

type Result<T> = std::result::Result<T, StreamError>;

/// Which side sent a message; part of every MAC, so nothing can be
/// reflected back to its sender.
#[derive(Clone, Copy)]
enum Side {
    Source = 1,
    Restorer = 2,
}

/// One end of an authenticated connection.
pub struct Stream<S> {
    io: S,
    key: [u8; 32],
    me: Side,
    sent: u64,
    received: u64,
}

fn stream_key(cluster_key: &[u8]) -> [u8; 32] {
    blake3::derive_key(CONTEXT, cluster_key)
}

fn proof(key: &[u8; 32], side: Side, parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&[b'P', side as u8]);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Fills `buf` from the kernel's random source.
fn random(buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        // SAFETY: writes at most `buf.len() - at` bytes into `buf[at..]`.
        let n = unsafe { libc::getrandom(buf[at..].as_mut_ptr().cast(), buf.len() - at, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            at += n as usize;
        }
    }
    Ok(())
}

fn nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    random(&mut n)?;
    Ok(n)
}

/// A fresh random session id.
pub fn new_session() -> io::Result<SessionId> {
    let mut s = [0u8; 16];
    random(&mut s)?;
    Ok(s)
}

/// The restoring node's side of the handshake.
pub fn connect<S: Read + Write>(
    mut io: S,
    cluster_key: &[u8],
    session: &SessionId,
) -> Result<Stream<S>> {
    let k = stream_key(cluster_key);
    let mine = nonce()?;
    let mut hello = Vec::with_capacity(8 + 16 + 32);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(session);
    hello.extend_from_slice(&mine);
    io.write_all(&hello)?;
    let mut challenge = [0u8; 64];
    io.read_exact(&mut challenge)
        .map_err(closed_means_refused)?;
    let (theirs, their_proof) = challenge.split_at(32);
    let expected = proof(&k, Side::Source, &[session, &mine, theirs]);
    if !constant_eq(&expected, their_proof) {
        return Err(StreamError::NotAuthenticated);
    }
    io.write_all(&proof(&k, Side::Restorer, &[session, theirs, &mine]))?;
    Ok(Stream::new(io, &k, session, theirs, &mine, Side::Restorer))
}

/// The source node's side of the handshake: `session` is the one its
/// manifest names.
pub fn accept<S: Read + Write>(
    mut io: S,
    cluster_key: &[u8],
    session: &SessionId,
) -> Result<Stream<S>> {
    let k = stream_key(cluster_key);
    let mut hello = [0u8; 8 + 16 + 32];
    io.read_exact(&mut hello)?;
    if &hello[..8] != MAGIC {
        return Err(StreamError::NotOurs);
    }
    if !constant_eq(&hello[8..24], session) {
        // Another transfer's (or a made-up) session: no proof for it.
        return Err(StreamError::NotAuthenticated);
    }
    let theirs = &hello[24..];
    let mine = nonce()?;
    let mut challenge = Vec::with_capacity(64);
    challenge.extend_from_slice(&mine);
    challenge.extend_from_slice(&proof(&k, Side::Source, &[session, theirs, &mine]));
    io.write_all(&challenge)?;
    let mut their_proof = [0u8; 32];
    io.read_exact(&mut their_proof)?;
    if !constant_eq(
        &proof(&k, Side::Restorer, &[session, &mine, theirs]),
        &their_proof,
    ) {
        return Err(StreamError::NotAuthenticated);
    }
    Ok(Stream::new(io, &k, session, &mine, theirs, Side::Source))
}

/// A source that closes the connection during the handshake refused us
/// (a wrong key, or another transfer's session).
fn closed_means_refused(e: io::Error) -> StreamError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        StreamError::NotAuthenticated
    } else {
        StreamError::Io(e)
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S: Read + Write> Stream<S> {
    fn new(
        io: S,
        k: &[u8; 32],
        session: &SessionId,
        source_nonce: &[u8],
        restorer_nonce: &[u8],
        me: Side,
    ) -> Stream<S> {
        let mut h = blake3::Hasher::new_keyed(k);
        h.update(b"K");
        h.update(session);
        h.update(source_nonce);
        h.update(restorer_nonce);
        Stream {
            io,
            key: h.finalize().into(),
            me,
            sent: 0,
            received: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    fn mac(&self, side: Side, seq: u64, head: &[u8], body: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&[side as u8]);
        h.update(&seq.to_le_bytes());
        h.update(head);
        h.update(body);
        h.finalize().into()
    }

    fn send(&mut self, head: &[u8], body: &[u8]) -> Result<()> {
        let mac = self.mac(self.me, self.sent, head, body);
        self.sent += 1;
        // One write for the whole message: no delayed-ACK stall between
        // its parts (writev, without copying the pages).
        let mut parts = [
            io::IoSlice::new(head),
            io::IoSlice::new(body),
            io::IoSlice::new(&mac),
        ];
        let mut parts: &mut [io::IoSlice] = &mut parts;
        while !parts.is_empty() {
            match self.io.write_vectored(parts) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => io::IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn check(&mut self, head: &[u8], body: &[u8]) -> Result<()> {
        let peer = match self.me {
            Side::Source => Side::Restorer,
            Side::Restorer => Side::Source,
        };
        let mut mac = [0u8; MAC_LEN];
        self.io.read_exact(&mut mac)?;
        let expected = self.mac(peer, self.received, head, body);
        self.received += 1;
        if constant_eq(&expected, &mac) {
            Ok(())
        } else {
            Err(StreamError::BadMac)
        }
    }

    /// Restorer: sends a request.
    pub fn request(&mut self, r: Request) -> Result<()> {
        let mut head = [0u8; 17];
        match r {
            Request::Get { pid, vaddr, pages } => {
                head[0] = 1;
                head[1..5].copy_from_slice(&pid.to_le_bytes());
                head[5..13].copy_from_slice(&vaddr.to_le_bytes());
                head[13..17].copy_from_slice(&pages.to_le_bytes());
            }
            Request::Done => head[0] = 2,
        }
        self.send(&head, &[])
    }

    /// Source: the next request; None when the restorer closed the
    /// connection between two requests.
    pub fn next_request(&mut self) -> Result<Option<Request>> {
        let mut head = [0u8; 17];
        match self.io.read(&mut head[..1])? {
            0 => return Ok(None),
            _ => self.io.read_exact(&mut head[1..])?,
        }
        self.check(&head, &[])?;
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or([0; 4]));
        match head[0] {
            1 => {
                let pages = u32_at(13);
                if pages == 0 || pages > MAX_PAGES {
                    return Err(StreamError::Malformed(format!(
                        "a request for {pages} pages (1 to {MAX_PAGES})"
                    )));
                }
                Ok(Some(Request::Get {
                    pid: u32_at(1),
                    vaddr: u64::from_le_bytes(head[5..13].try_into().unwrap_or([0; 8])),
                    pages,
                }))
            }
            2 => Ok(Some(Request::Done)),
            k => Err(StreamError::Malformed(format!("unknown request kind {k}"))),
        }
    }

    /// Source: answers the last request.
    pub fn answer(&mut self, a: &Answer<'_>) -> Result<()> {
        let (kind, vaddr, body): (u8, u64, &[u8]) = match a {
            Answer::Pages { vaddr, bytes } => (1, *vaddr, bytes),
            Answer::Finished => (2, 0, &[]),
            Answer::Refused(why) => {
                let end = why.len().min(MAX_TEXT);
                (3, 0, &why.as_bytes()[..end])
            }
        };
        let mut head = [0u8; 13];
        head[0] = kind;
        head[1..9].copy_from_slice(&vaddr.to_le_bytes());
        head[9..13].copy_from_slice(&(body.len() as u32).to_le_bytes());
        self.send(&head, body)
    }

    /// Restorer: the answer to the last request, its pages read into the
    /// front of `buf` (which bounds what is accepted).
    pub fn read_answer(&mut self, buf: &mut [u8]) -> Result<AnswerHead> {
        let mut head = [0u8; 13];
        self.io.read_exact(&mut head)?;
        let vaddr = u64::from_le_bytes(head[1..9].try_into().unwrap_or([0; 8]));
        let len = u32::from_le_bytes(head[9..13].try_into().unwrap_or([0; 4])) as usize;
        let limit = match head[0] {
            1 => buf.len(),
            2 => 0,
            3 => MAX_TEXT,
            k => return Err(StreamError::Malformed(format!("unknown answer kind {k}"))),
        };
        if len > limit {
            return Err(StreamError::Malformed(format!(
                "an answer of {len} bytes where at most {limit} fit"
            )));
        }
        let mut text = Vec::new();
        let body: &mut [u8] = if head[0] == 1 {
            &mut buf[..len]
        } else {
            text.resize(len, 0);
            &mut text
        };
        self.io.read_exact(body)?;
        self.check(&head, body)?;
        Ok(match head[0] {
            1 if len == 0 || !len.is_multiple_of(PAGE_SIZE) => {
                return Err(StreamError::Malformed(format!(
                    "{len} bytes of pages: not whole pages"
                )))
            }
            1 => AnswerHead::Pages { vaddr, len },
            2 => AnswerHead::Finished,
            _ => AnswerHead::Refused(String::from_utf8_lossy(&text).into_owned()),
        })
    }
}

/// An answer as the restorer reads it (the pages stay in its buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerHead {
    Pages { vaddr: u64, len: usize },
    Finished,
    Refused(String),
}

/// Hex of a session id, for the manifest.
pub fn session_hex(s: &SessionId) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

/// A session id from the manifest's hex.
pub fn parse_session(hex: &str) -> Option<SessionId> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut s = [0u8; 16];
    for (i, b) in s.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const SESSION: SessionId = [7; 16];

    fn pair(
        source_key: &'static [u8],
        session: SessionId,
    ) -> (
        std::thread::JoinHandle<Result<Stream<UnixStream>>>,
        Result<Stream<UnixStream>>,
    ) {
        let (a, b) = UnixStream::pair().unwrap();
        let source = std::thread::spawn(move || accept(a, source_key, &SESSION));
        let restorer = connect(b, KEY, &session);
        (source, restorer)
    }

    #[test]
    fn pages_go_through_and_both_ends_check_them() {
        let (source, restorer) = pair(KEY, SESSION);
        let mut r = restorer.unwrap();
        let mut s = source.join().unwrap().unwrap();
        r.request(Request::Get {
            pid: 42,
            vaddr: 0x1000,
            pages: 2,
        })
        .unwrap();
        assert_eq!(
            s.next_request().unwrap(),
            Some(Request::Get {
                pid: 42,
                vaddr: 0x1000,
                pages: 2
            })
        );
        let page = vec![5u8; PAGE_SIZE];
        s.answer(&Answer::Pages {
            vaddr: 0x1000,
            bytes: &page,
        })
        .unwrap();
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        assert_eq!(
            r.read_answer(&mut buf).unwrap(),
            AnswerHead::Pages {
                vaddr: 0x1000,
                len: PAGE_SIZE
            }
        );
        assert_eq!(&buf[..PAGE_SIZE], &page[..]);
        r.request(Request::Done).unwrap();
        assert_eq!(s.next_request().unwrap(), Some(Request::Done));
        s.answer(&Answer::Finished).unwrap();
        assert_eq!(r.read_answer(&mut buf).unwrap(), AnswerHead::Finished);
        drop(r);
        assert_eq!(s.next_request().unwrap(), None);
    }

    #[test]
    fn a_wrong_key_or_session_is_refused_on_both_sides() {
        let (source, restorer) = pair(b"another key, also thirty-two byt", SESSION);
        assert!(matches!(restorer, Err(StreamError::NotAuthenticated)));
        assert!(source.join().unwrap().is_err());
        let (source, restorer) = pair(KEY, [8; 16]);
        assert!(matches!(
            source.join().unwrap(),
            Err(StreamError::NotAuthenticated)
        ));
        assert!(restorer.is_err());
    }

    #[test]
    fn a_changed_page_fails_its_mac() {
        let (a, b) = UnixStream::pair().unwrap();
        let source = std::thread::spawn(move || {
            let mut s = accept(a, KEY, &SESSION).unwrap();
            s.next_request().unwrap();
            // What goes out on the wire, with one bit flipped by a
            // man in the middle: build the message, then corrupt it.
            let mut msg = Vec::new();
            let body = vec![1u8; PAGE_SIZE];
            let mut head = [0u8; 13];
            head[0] = 1;
            head[9..13].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            let mac = s.mac(Side::Source, 0, &head, &body);
            msg.extend_from_slice(&head);
            msg.extend_from_slice(&body);
            msg[100] ^= 1;
            msg.extend_from_slice(&mac);
            s.io.write_all(&msg).unwrap();
        });
        let mut r = connect(b, KEY, &SESSION).unwrap();
        r.request(Request::Get {
            pid: 1,
            vaddr: 0,
            pages: 1,
        })
        .unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        assert!(matches!(r.read_answer(&mut buf), Err(StreamError::BadMac)));
        source.join().unwrap();
    }

    #[test]
    fn oversized_or_unknown_messages_are_refused() {
        let (source, restorer) = pair(KEY, SESSION);
        let mut r = restorer.unwrap();
        let mut s = source.join().unwrap().unwrap();
        r.request(Request::Get {
            pid: 1,
            vaddr: 0,
            pages: MAX_PAGES + 1,
        })
        .unwrap();
        assert!(matches!(s.next_request(), Err(StreamError::Malformed(_))));
        // An answer larger than the buffer asked for.
        s.answer(&Answer::Pages {
            vaddr: 0,
            bytes: &[0; 2 * PAGE_SIZE],
        })
        .unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        assert!(matches!(
            r.read_answer(&mut buf),
            Err(StreamError::Malformed(_))
        ));
    }

    #[test]
    fn session_ids_round_trip_through_hex_and_garbage_is_none() {
        let s = new_session().unwrap();
        assert_eq!(parse_session(&session_hex(&s)), Some(s));
        for bad in ["", "zz", &"g".repeat(32), &"é".repeat(16)] {
            assert_eq!(parse_session(bad), None, "{bad}");
        }
    }
}
