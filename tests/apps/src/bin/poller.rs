//! Benchmark helper: polls the test app's HTTP counter every 10 ms and
//! reports the downtime a client saw.
//!
//!   poller HOST:PORT SECONDS
//!
//! Prints `first_ok_ms last_ok_ms max_gap_ms answers` where the gap is the
//! longest time between two successful answers (the service's downtime as
//! the client lived it). Each request has a 50 ms connect timeout, so a
//! frozen or locked network counts as down, not as one long request.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

fn ask(addr: &std::net::SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_millis(50)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.0 200")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args[1]
        .to_socket_addrs()
        .expect("HOST:PORT")
        .next()
        .unwrap();
    let secs: f64 = args[2].parse().expect("SECONDS");
    let start = Instant::now();
    let (mut first, mut last, mut gap, mut n) = (None::<f64>, None::<f64>, 0f64, 0u64);
    while start.elapsed().as_secs_f64() < secs {
        let t = start.elapsed().as_secs_f64() * 1000.0;
        if ask(&addr) {
            if let Some(l) = last {
                gap = gap.max(t - l);
            }
            first.get_or_insert(t);
            last = Some(t);
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "{:.0} {:.0} {:.0} {n}",
        first.unwrap_or(-1.0),
        last.unwrap_or(-1.0),
        gap
    );
}
