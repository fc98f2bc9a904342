//! A small command-line front for criu-sys, used by hack/demo and handy when
//! poking at CRIU by hand:
//!
//!   criu_rpc CRIU version|check|features
//!   criu_rpc CRIU dump PID IMAGES_DIR [--leave-running]
//!   criu_rpc CRIU restore IMAGES_DIR

use std::time::{Duration, Instant};

use criu_sys::{open_dir, Criu, Options};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("criu_rpc: {e}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let usage =
        "usage: criu_rpc CRIU version|check|features|dump PID DIR [--leave-running]|restore DIR";
    let criu = Criu::new(args.first().ok_or(usage)?).deadline(Duration::from_secs(120));
    let started = Instant::now();
    match args.get(1).map(String::as_str) {
        Some("version") => println!("CRIU {}", criu.version()?),
        Some("check") => {
            criu.check()?;
            println!("CRIU check: ok");
        }
        Some("features") => println!("{:?}", criu.feature_check()?),
        Some("dump") => {
            let pid: i32 = args.get(2).ok_or(usage)?.parse()?;
            let dir = args.get(3).ok_or(usage)?;
            let leave = args.iter().any(|a| a == "--leave-running");
            let opts = Options::new()
                .images_dir(open_dir(dir.as_ref())?)
                .log_file("dump.log")
                .pid(pid)
                .leave_running(leave);
            criu.dump(&opts, None)?;
            println!("dumped pid {pid} to {dir} in {:?}", started.elapsed());
        }
        Some("restore") => {
            let dir = args.get(2).ok_or(usage)?;
            let opts = Options::new()
                .images_dir(open_dir(dir.as_ref())?)
                .log_file("restore.log");
            let pid = criu.restore(&opts, None)?;
            println!("restored pid {pid} from {dir} in {:?}", started.elapsed());
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
