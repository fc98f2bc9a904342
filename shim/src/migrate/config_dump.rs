//! `config.dump`: who the checkpointed container was, in the shape
//! checkpointctl (and Podman, CRI-O, containerd's CRI) read: RFC 3339
//! times, the container's name and image. Informational: a restore never
//! takes anything from it.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerConfig {
    pub id: String,
    /// The container's name (its name in the pod, for the CRI).
    pub name: String,
    #[serde(
        rename = "rootfsImageName",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub rootfs_image_name: Option<String>,
    #[serde(
        rename = "rootfsImageRef",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub rootfs_image_ref: Option<String>,
    /// The runtime that made the checkpoint.
    pub runtime: String,
    #[serde(rename = "createdTime")]
    pub created_time: String,
    #[serde(rename = "checkpointedTime")]
    pub checkpointed_time: String,
}

/// `2026-12-02T03:04:17Z` for `t` (UTC, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_and_fields_use_checkpointctl_s_names() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_796_180_657)),
            "2026-12-02T03:04:17Z"
        );
        let c = ContainerConfig {
            id: "abc".into(),
            name: "web".into(),
            rootfs_image_name: Some("nginx:1".into()),
            rootfs_image_ref: None,
            runtime: "io.containerd.criu.v2".into(),
            created_time: rfc3339(UNIX_EPOCH),
            checkpointed_time: rfc3339(UNIX_EPOCH),
        };
        let v = serde_json::to_value(&c).unwrap();
        for k in [
            "id",
            "name",
            "rootfsImageName",
            "runtime",
            "createdTime",
            "checkpointedTime",
        ] {
            assert!(v.get(k).is_some(), "{k} missing: {v}");
        }
        assert!(v.get("rootfsImageRef").is_none());
    }
}
