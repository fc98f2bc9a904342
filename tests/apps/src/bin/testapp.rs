//! The test image's program: an HTTP counter that holds memory.
//!
//!   testapp [--port P] [-m MIB] [--random]
//!
//! Every HTTP request gets the next count ("1", "2", ...), so a restored
//! container proves it kept its memory by answering with the count that
//! follows the last one before the checkpoint. `-m` allocates and touches MIB
//! mebibytes (a non-zero pattern, or random bytes with --random) so that
//! checkpoints have real memory to move. Built statically: the test image has
//! no libc.

use std::io::{Read, Write};
use std::net::TcpListener;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut port = 8080u16;
    let mut mib = 0usize;
    let mut random = false;
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
            "--random" => random = true,
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
    let memory = fill(mib, random);
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    eprintln!("testapp: listening on {port}, holding {mib} MiB");
    let mut count: u64 = 0;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        count += 1;
        // Touch the memory so it stays resident and is really in use.
        let check = memory
            .iter()
            .step_by(4096)
            .fold(0u8, |a, b| a.wrapping_add(*b));
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

fn fill(mib: usize, random: bool) -> Vec<u8> {
    let mut v = vec![0u8; mib << 20];
    // xorshift: cheap, and incompressible enough for --random.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        } else {
            chunk.fill((i % 251) as u8 + 1);
        }
    }
    v
}
