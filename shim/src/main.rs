//! `containerd-shim-criu-v2`: containerd's runtime v2 shim for
//! `io.containerd.criu.v2`. containerd runs it as `start`, `delete`, or the
//! long-lived server; all three go through the containerd-shim crate.

mod beneath;
mod checkpoint;
mod cli;
mod container;
mod criu_front;
mod error;
mod events;
mod messages;
mod migrate;
mod netfix;
mod oom;
mod page_stream;
mod process;
mod reaper;
mod restore;
mod runc;
mod service;
mod shim;
mod spec;
mod stats;
mod stdio;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // runc runs its CRIU as `<criu> swrk <fd>`; we are that CRIU for runc.
    if args.get(1).map(String::as_str) == Some("swrk") {
        criu_front::main(&args);
    }
    if args.len() > 1 && cli::COMMANDS.contains(&args[1].as_str()) {
        cli::main(&args);
    }
    containerd_shim::run::<shim::CriuShim>(criu_shim_config::RUNTIME_ID, None);
}
