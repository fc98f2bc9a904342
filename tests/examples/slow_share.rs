//! A slow share for benchmarks: an sshfs mount (a file server in its own
//! network namespace, see `criu_shim_tests::sshfs`) whose writes are
//! limited to RATE bytes per second (pv's syntax: `50m`).
//!
//!   slow_share RATE
//!
//! Prints the mount point, then keeps the share until its stdin closes.

use std::io::Read;

fn main() {
    let Some(rate) = std::env::args().nth(1) else {
        eprintln!("usage: slow_share RATE (such as 50m)");
        std::process::exit(2);
    };
    let share = criu_shim_tests::sshfs::SshfsShare::start_throttled(1, &rate);
    println!("{}", share.mount_point(0).display());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
