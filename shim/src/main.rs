//! `containerd-shim-criu-v2`: containerd's runtime v2 shim for
//! `io.containerd.criu.v2`. containerd runs it as `start`, `delete`, or the
//! long-lived server; all three go through the containerd-shim crate.

mod container;
mod error;
mod events;
mod oom;
mod process;
mod reaper;
mod runc;
mod service;
mod shim;
mod stats;
mod stdio;

fn main() {
    containerd_shim::run::<shim::CriuShim>(criu_shim_config::RUNTIME_ID, None);
}
