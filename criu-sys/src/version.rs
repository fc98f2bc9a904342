//! CRIU versions, and which version each option we send first appeared in.
//!
//! An older CRIU silently ignores protobuf fields it does not know, which would
//! turn "please leave the tasks stopped" into "killed them". So options that
//! change behaviour are checked against the running CRIU before a request is
//! sent, and the error says which version is needed.

use std::fmt;

use crate::rpc::CriuVersion;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub sublevel: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, sublevel: u32) -> Self {
        Version {
            major,
            minor,
            sublevel,
        }
    }

    pub(crate) fn from_rpc(v: &CriuVersion) -> Self {
        let clamp = |n: i32| u32::try_from(n).unwrap_or(0);
        Version::new(
            clamp(v.major_number()),
            clamp(v.minor_number()),
            clamp(v.sublevel()),
        )
    }

    /// Parses "4.2", "4.2.1" or "Version: 4.2.1" (the first line of `criu --version`).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().trim_start_matches("Version:").trim();
        let mut parts = s.split('.').map(|p| p.trim().parse::<u32>());
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let sublevel = match parts.next() {
            Some(p) => p.ok()?,
            None => 0,
        };
        Some(Version::new(major, minor, sublevel))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.sublevel != 0 {
            write!(f, ".{}", self.sublevel)?;
        }
        Ok(())
    }
}

/// Full answer to a VERSION request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: Version,
    /// Git id of a development build; `None` for releases.
    pub gitid: Option<String>,
    /// Release name, e.g. "CRIUty Rose".
    pub name: Option<String>,
}

impl fmt::Display for VersionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.version)?;
        if let Some(g) = &self.gitid {
            write!(f, " ({g})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_strings() {
        assert_eq!(Version::parse("4.2.1"), Some(Version::new(4, 2, 1)));
        assert_eq!(
            Version::parse("Version: 3.17"),
            Some(Version::new(3, 17, 0))
        );
        assert_eq!(Version::parse("garbage"), None);
        assert_eq!(Version::parse("4"), None);
    }

    #[test]
    fn orders_and_prints() {
        assert!(Version::new(4, 2, 1) > Version::new(4, 2, 0));
        assert!(Version::new(3, 17, 1) < Version::new(4, 0, 0));
        assert_eq!(Version::new(4, 2, 0).to_string(), "4.2");
        assert_eq!(Version::new(4, 2, 1).to_string(), "4.2.1");
    }
}
