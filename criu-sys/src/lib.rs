//! criu-sys: a hand-written binding of CRIU's RPC protocol.
//!
//! CRIU offers a service mode, `criu swrk <fd>`: the caller forks CRIU with
//! one end of a SOCK_SEQPACKET socketpair, sends a protobuf `criu_req`, answers
//! any `notify` messages, and reads one `criu_resp`. This crate is that
//! protocol and nothing else: no containers, no archives, no runc. Reading
//! the few image fields that decide a restored process's privileges
//! ([`images`]) is part of it: CRIU's images are its other protocol. It speaks
//! directly to the CRIU binary (not libcriu), so the only thing a node needs
//! is a CRIU executable, and it stays correct inside a containerd shim where
//! another thread reaps every child (see [`reaper`]).
//!
//! ```no_run
//! use criu_sys::{Criu, Options, open_dir};
//! # fn main() -> criu_sys::Result<()> {
//! let criu = Criu::new("/usr/sbin/criu").deadline(std::time::Duration::from_secs(60));
//! let opts = Options::new()
//!     .images_dir(open_dir("/tmp/images".as_ref())?)
//!     .log_file("dump.log")
//!     .pid(4242)
//!     .leave_running(true);
//! criu.dump(&opts, None)?;
//! # Ok(()) }
//! ```

pub mod criu;
pub mod error;
pub mod images;
pub mod lazy;
pub mod memory;
pub mod notify;
pub mod options;
pub mod page_xfer;
pub mod reaper;
pub mod rpc;
pub mod rpc_images;
pub mod service;
mod transport;
pub mod version;

pub use criu::{Criu, Features, PageServer};
pub use error::{CriuFailure, Error, Request, Result};
pub use notify::{Action, Notification, Notify};
pub use options::{open_dir, CgroupMode, JoinNs, LogLevel, NetworkLock, Options};
pub use reaper::{ChildExit, ExitWatch, Reaper, WaitPid};
pub use service::ServiceSocket;
pub use version::{Version, VersionInfo};

/// The oldest CRIU this binding is tested with and supports.
pub const MIN_VERSION: Version = Version::new(3, 16, 0);

/// How many "Error" lines of CRIU's log an error carries.
pub const MAX_LOG_ERRORS: usize = 8;
