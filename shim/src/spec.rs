//! What the shim reads from a container's OCI spec (`config.json` in its
//! bundle): our annotations, and the CRI's that say which pod a container
//! belongs to and what it is called there.

use std::path::Path;

use criu_shim_config as cfg;

use crate::error::Result;
use crate::migrate::share::Tenant;

pub struct Spec(serde_json::Value);

impl Spec {
    /// The bundle's spec; an unreadable one reads as empty (no annotations).
    pub fn read(bundle: &Path) -> Spec {
        Spec(
            std::fs::read_to_string(bundle.join("config.json"))
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default(),
        )
    }

    /// A non-empty annotation.
    pub fn annotation(&self, name: &str) -> Option<&str> {
        self.0["annotations"][name]
            .as_str()
            .filter(|s| !s.is_empty())
    }

    /// A CRI pod's sandbox (pause) container. Pod annotations reach its spec
    /// too, but the pause process is made afresh on every node: our
    /// checkpoint and restore annotations do not apply to it.
    pub fn is_pod_sandbox(&self) -> bool {
        self.annotation(cfg::ANNOTATION_CONTAINER_TYPE) == Some("sandbox")
    }

    pub fn checkpoint_to(&self) -> Option<&str> {
        self.ours(cfg::ANNOTATION_CHECKPOINT_TO)
    }

    /// A checkpoint of any container checkpoints the whole pod.
    pub fn checkpoint_pod(&self) -> bool {
        self.ours(cfg::ANNOTATION_CHECKPOINT_POD) == Some("true")
    }

    pub fn restore_from(&self) -> Option<&str> {
        self.ours(cfg::ANNOTATION_RESTORE_FROM)
    }

    /// How a restore of this container brings memory back: its
    /// annotation, else the node's setting.
    pub fn migration(&self, node: cfg::MigrationMode) -> Result<cfg::MigrationMode> {
        match self.ours(cfg::ANNOTATION_MIGRATION) {
            None => Ok(node),
            Some(v) => cfg::MigrationMode::parse(v).ok_or_else(|| {
                crate::error::Error::InvalidArgument(format!(
                    "{}={v}: expected cold, lazy or post-copy",
                    cfg::ANNOTATION_MIGRATION
                ))
            }),
        }
    }

    /// The container's name in its pod (CRI), the same on every node.
    pub fn container_name(&self) -> Option<&str> {
        self.annotation(cfg::ANNOTATION_CONTAINER_NAME)
    }

    /// The image the container runs (CRI), for checkpointctl.
    pub fn image_name(&self) -> Option<&str> {
        self.annotation(cfg::ANNOTATION_IMAGE_NAME)
    }

    /// The pod a container belongs to (CRI): its sandbox's id.
    pub fn sandbox_id(&self) -> Option<&str> {
        self.annotation(cfg::ANNOTATION_SANDBOX_ID)
    }

    /// Whose checkpoints this container's are: its pod's Kubernetes
    /// namespace, or containerd's own users for containers made without
    /// the CRI.
    pub fn tenant(&self) -> Result<Tenant> {
        match self.annotation(cfg::ANNOTATION_SANDBOX_NAMESPACE) {
            Some(ns) => Tenant::namespace(ns),
            None => Ok(Tenant::Containerd),
        }
    }

    fn ours(&self, name: &str) -> Option<&str> {
        if self.is_pod_sandbox() {
            None
        } else {
            self.annotation(name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: serde_json::Value) -> Spec {
        Spec(serde_json::json!({ "annotations": annotations }))
    }

    #[test]
    fn the_sandbox_ignores_our_pod_annotations() {
        let sandbox = spec(serde_json::json!({
            "io.kubernetes.cri.container-type": "sandbox",
            "criu-shim.io/restore-from": "job",
        }));
        assert!(sandbox.is_pod_sandbox());
        assert_eq!(sandbox.restore_from(), None);
        let app = spec(serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": "web",
            "criu-shim.io/restore-from": "job",
            "criu-shim.io/checkpoint-to": "",
        }));
        assert_eq!(app.restore_from(), Some("job"));
        assert_eq!(app.checkpoint_to(), None, "empty means unset");
        assert_eq!(app.container_name(), Some("web"));
        assert_eq!(Spec::read(Path::new("/nonexistent")).restore_from(), None);
        assert_eq!(app.tenant().unwrap(), Tenant::Containerd);
        let pod = spec(serde_json::json!({"io.kubernetes.cri.sandbox-namespace": "team-a"}));
        assert_eq!(pod.tenant().unwrap(), Tenant::Namespace("team-a".into()));
        let bad = spec(serde_json::json!({"io.kubernetes.cri.sandbox-namespace": "../x"}));
        assert!(bad.tenant().is_err());
    }
}
