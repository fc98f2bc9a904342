//! A slow share for benchmarks: the tests' sshfs share (a file server in
//! its own network namespace, see `criu_shim_tests::sshfs`) behind a link
//! whose write direction is limited to RATE (tc's syntax: `400mbit` is
//! 50 MB/s).
//!
//!   slow_share RATE KEEP_FILE
//!
//! Prints the mount point, then keeps the share while KEEP_FILE exists.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [rate, keep] = args.as_slice() else {
        eprintln!("usage: slow_share RATE KEEP_FILE (RATE such as 400mbit)");
        std::process::exit(2);
    };
    let share = criu_shim_tests::sshfs::SshfsShare::start_throttled(1, rate);
    println!("{}", share.mount_point(0).display());
    while std::path::Path::new(keep).exists() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
