//! Test helper for criu-sys's real-CRIU tests: counts in memory and publishes
//! the count to a file every 20 ms. A restored copy keeps counting from where
//! the dump left it; a fresh start would begin again at 1.
//!
//! Usage: counter FILE

use std::time::Duration;

fn main() {
    let path = std::env::args().nth(1).expect("usage: counter FILE");
    let tmp = format!("{path}.tmp");
    let mut count: u64 = 0;
    loop {
        count += 1;
        // Written under a temporary name and renamed, so a reader never sees
        // a half-written number; no file stays open across a dump.
        if std::fs::write(&tmp, count.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
