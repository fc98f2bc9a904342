//! Notifications CRIU sends in the middle of a request (when `notify_scripts`
//! is set), and the callback that answers them.
//!
//! The answer matters: CRIU waits for it, and a refusal aborts the dump or
//! restore. That is how a caller does work at exactly the right moment, for
//! example configure the network of a restored task in `setup-namespaces`
//! before its processes run, or measure how long the tasks stayed frozen
//! between `pre-dump` and `post-dump`.

use std::fmt;
use std::os::fd::OwnedFd;

/// The actions CRIU announces. Unknown names are kept as [`Action::Other`] so
/// a newer CRIU does not break an older binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    PreDump,
    PostDump,
    PreRestore,
    PostRestore,
    NetworkLock,
    NetworkUnlock,
    SetupNamespaces,
    PostSetupNamespaces,
    PreResume,
    PostResume,
    OrphanPtsMaster,
    StatusReady,
    Other(String),
}

impl Action {
    pub fn from_script(name: &str) -> Self {
        match name {
            "pre-dump" => Action::PreDump,
            "post-dump" => Action::PostDump,
            "pre-restore" => Action::PreRestore,
            "post-restore" => Action::PostRestore,
            "network-lock" => Action::NetworkLock,
            "network-unlock" => Action::NetworkUnlock,
            "setup-namespaces" => Action::SetupNamespaces,
            "post-setup-namespaces" => Action::PostSetupNamespaces,
            "pre-resume" => Action::PreResume,
            "post-resume" => Action::PostResume,
            "orphan-pts-master" => Action::OrphanPtsMaster,
            "status-ready" => Action::StatusReady,
            other => Action::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Action::PreDump => "pre-dump",
            Action::PostDump => "post-dump",
            Action::PreRestore => "pre-restore",
            Action::PostRestore => "post-restore",
            Action::NetworkLock => "network-lock",
            Action::NetworkUnlock => "network-unlock",
            Action::SetupNamespaces => "setup-namespaces",
            Action::PostSetupNamespaces => "post-setup-namespaces",
            Action::PreResume => "pre-resume",
            Action::PostResume => "post-resume",
            Action::OrphanPtsMaster => "orphan-pts-master",
            Action::StatusReady => "status-ready",
            Action::Other(s) => s,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One notification.
#[derive(Debug)]
pub struct Notification {
    pub action: Action,
    /// The root pid of the tree, where CRIU gives one (0 is mapped to `None`).
    pub pid: Option<i32>,
    /// A descriptor CRIU passed along (the pty master with
    /// `orphan-pts-master`). The callback may take it.
    pub fd: Option<OwnedFd>,
}

/// Answers notifications. Returning `Err(reason)` makes CRIU abort the
/// request; the operation then fails with [`crate::Error::NotifyRejected`].
pub trait Notify {
    fn notify(&mut self, n: &mut Notification) -> Result<(), String>;
}

/// Any closure works as a callback, so it can capture state.
impl<F> Notify for F
where
    F: FnMut(&mut Notification) -> Result<(), String>,
{
    fn notify(&mut self, n: &mut Notification) -> Result<(), String> {
        self(n)
    }
}

/// Accepts every notification. Used when the caller passes no callback.
pub(crate) struct AcceptAll;

impl Notify for AcceptAll {
    fn notify(&mut self, _n: &mut Notification) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_round_trip() {
        for name in [
            "pre-dump",
            "post-dump",
            "network-lock",
            "setup-namespaces",
            "orphan-pts-master",
            "post-restore",
            "something-new",
        ] {
            assert_eq!(Action::from_script(name).as_str(), name);
        }
        assert_eq!(
            Action::from_script("x-future"),
            Action::Other("x-future".into())
        );
    }

    #[test]
    fn closures_capture_state() {
        let mut seen = Vec::new();
        let mut cb = |n: &mut Notification| {
            seen.push(n.action.clone());
            Ok(())
        };
        let mut n = Notification {
            action: Action::PreDump,
            pid: None,
            fd: None,
        };
        cb.notify(&mut n).unwrap();
        assert_eq!(seen, vec![Action::PreDump]);
    }
}
