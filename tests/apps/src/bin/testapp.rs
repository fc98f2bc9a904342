//! The test image's program: an HTTP counter that holds memory.
//!
//!   testapp [--port P] [-m MIB] [--fill pattern|random|realistic|zero] [--random]
//!           [--touch all|PAGES]
//!
//! Every HTTP request gets the next count ("1", "2", ...), so a restored
//! container proves it kept its memory by answering with the count that
//! follows the last one before the checkpoint. `-m` allocates and touches MIB
//! mebibytes so that checkpoints have real memory to move, filled with:
//! - `pattern` (default): a repeating non-zero byte pattern (compresses
//!   about 3000:1: flattering, not what programs hold);
//! - `random` (`--random`): incompressible bytes;
//! - `realistic`: 64-byte records like a program's heap (sequential ids,
//!   increasing timestamps, measurements of limited precision, small enums,
//!   names from a vocabulary, some zero padding), about 3-4:1 with
//!   `zstd -1`, like real programs' memory;
//! - `zero`: touched pages of zeros.
//!
//! Each count reads one byte of every page of that memory (`--touch all`,
//! the default: a simulation stepping through its state), or of PAGES
//! pages spread over it (`--touch 16`: a cache answering a lookup), which
//! is what decides how soon a lazily restored copy can answer.
//!
//! `GET /hash` answers `HASH EXPECTED` (FNV-1a of all the memory now, and
//! when it was filled) without counting: after a move the two must match.
//! Built statically: the test image has no libc.

use std::io::{Read, Write};
use std::net::TcpListener;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut port = 8080u16;
    let mut mib = 0usize;
    let mut kind = Fill::Pattern;
    let mut touch: Option<usize> = None;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--port" => {
                port = args[i + 1].parse().expect("--port N");
                i += 1;
            }
            "-m" => {
                mib = args[i + 1].parse().expect("-m MIB");
                i += 1;
            }
            "--random" => kind = Fill::Random,
            "--touch" => {
                touch = match args[i + 1].as_str() {
                    "all" => None,
                    n => Some(n.parse().expect("--touch all|PAGES")),
                };
                i += 1;
            }
            "--fill" => {
                kind = match args[i + 1].as_str() {
                    "pattern" => Fill::Pattern,
                    "random" => Fill::Random,
                    "realistic" => Fill::Realistic,
                    "zero" => Fill::Zero,
                    other => panic!("unknown --fill {other}"),
                };
                i += 1;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    // As PID 1 of a container, SIGTERM would be ignored without a handler.
    extern "C" fn on_term(_: libc::c_int) {
        std::process::exit(0);
    }
    // SAFETY: installs a handler that only exits.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    let memory = fill(mib, kind);
    let expected = fnv1a(&memory);
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    eprintln!("testapp: listening on {port}, holding {mib} MiB");
    let mut count: u64 = 0;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).unwrap_or(0);
        if buf[..n].starts_with(b"GET /hash") {
            let body = format!("{:016x} {expected:016x}\n", fnv1a(&memory));
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            continue;
        }
        count += 1;
        // Touch the memory so it stays resident and is really in use: all
        // of it (a simulation's step), or a few pages (a cache's lookup).
        let check = match touch {
            None => memory
                .iter()
                .step_by(4096)
                .fold(0u8, |a, b| a.wrapping_add(*b)),
            Some(pages) => (0..pages).fold(0u8, |a, k| {
                let page = (count as usize)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(k.wrapping_mul(40_503))
                    % (memory.len() / 4096).max(1);
                a.wrapping_add(memory.get(page * 4096).copied().unwrap_or(0))
            }),
        };
        let body = format!("{count}\n");
        // A log line per answer: restored containers must keep logging.
        let _ = writeln!(std::io::stdout(), "served {count}");
        let _ = write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nX-Check: {check}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

#[derive(Clone, Copy)]
enum Fill {
    Pattern,
    Random,
    Realistic,
    Zero,
}

fn fill(mib: usize, kind: Fill) -> Vec<u8> {
    let mut v = vec![0u8; mib << 20];
    // xorshift: cheap, and incompressible enough for `random`.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match kind {
        Fill::Pattern => {
            for (i, chunk) in v.chunks_mut(8).enumerate() {
                chunk.fill((i % 251) as u8 + 1);
            }
        }
        Fill::Random => {
            for chunk in v.chunks_mut(8) {
                let bytes = next().to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
        }
        Fill::Realistic => {
            let mut stamp: u64 = 1_796_000_000_000;
            for (id, record) in v.chunks_mut(64).enumerate() {
                let r = next();
                stamp += r & 0x3ff;
                let mut rec = [0u8; 64];
                rec[0..8].copy_from_slice(&(id as u64).to_le_bytes());
                rec[8..16].copy_from_slice(&stamp.to_le_bytes());
                // Two measurements with a few significant digits.
                let a = ((r >> 10) % 10_000) as f32 / 100.0;
                let b = ((r >> 24) % 1_000) as f32 / 10.0;
                rec[16..20].copy_from_slice(&a.to_le_bytes());
                rec[20..24].copy_from_slice(&b.to_le_bytes());
                rec[24] = ((r >> 34) % 4) as u8; // a status
                rec[25] = ((r >> 36) % 3) as u8; // a kind
                const NAMES: [&[u8]; 8] = [
                    b"sensor-north",
                    b"sensor-south",
                    b"pump-a",
                    b"pump-b",
                    b"valve-main",
                    b"valve-aux",
                    b"meter-1",
                    b"meter-2",
                ];
                let name = NAMES[((r >> 40) % 8) as usize];
                rec[32..32 + name.len()].copy_from_slice(name);
                // A pointer-like field: a heap address near its neighbours.
                let ptr = 0x5555_0000_0000u64 + (id as u64) * 64 + ((r >> 48) & 0xff);
                rec[48..56].copy_from_slice(&ptr.to_le_bytes());
                record.copy_from_slice(&rec[..record.len()]);
            }
        }
        Fill::Zero => {
            // Touch every page, so it is resident and dumped.
            for page in v.chunks_mut(4096) {
                page[0] = 0;
                std::hint::black_box(&page[0]);
            }
        }
    }
    v
}

/// FNV-1a, 64 bits: enough to tell memory that survived from memory that did not.
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in data.chunks(8) {
        for b in chunk {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}
