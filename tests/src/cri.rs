//! A CRI client that behaves as the kubelet does, for tests and operators:
//! the calls a pod's life needs, over containerd's socket, synchronous on
//! top of tonic (the `k8s-cri` crate carries the CRI protobuf API).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1::{ContainerConfig, ContainerState, Mount, PodSandboxConfig};

pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// A CRI error as the kubelet would log it.
pub type CriResult<T> = Result<T, String>;

fn status(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

/// Stops again, as the kubelet does on its next sync, when containerd
/// answers `ttrpc: closed`. containerd 2.1's CRI has a race of its own
/// there (containerd#12396): a container that exits by itself (here: after
/// a checkpoint that does not leave it running) is deleted by the exit
/// handler, which closes the container's shim connection, before its state
/// says EXITED; a stop in that window sends Kill on the closed connection.
/// containerd 2.2 retries inside the call the same way (containerd#12399).
/// Any other error, and the third `ttrpc: closed`, is returned.
fn retry_on_closed_shim_connection(
    what: &str,
    mut call: impl FnMut() -> CriResult<()>,
) -> CriResult<()> {
    let mut attempt = 1;
    loop {
        match call() {
            Err(e) if e.contains("ttrpc: closed") && attempt < 3 => {
                eprintln!("{what} met containerd#12396 ({e}); again, as the kubelet would");
                std::thread::sleep(Duration::from_millis(100 * attempt * attempt));
                attempt += 1;
            }
            other => return other,
        }
    }
}

impl Cri {
    pub fn connect(socket: &Path) -> CriResult<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let path: PathBuf = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]")
                    .expect("static uri")
                    .timeout(Duration::from_secs(120))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .map_err(|e| format!("connect to CRI at {}: {e}", socket.display()))?;
        Ok(Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    pub fn version(&mut self) -> CriResult<cri::VersionResponse> {
        let r = self
            .rt
            .block_on(self.runtime.version(cri::VersionRequest::default()));
        r.map(|r| r.into_inner()).map_err(status)
    }

    pub fn image_present(&mut self, image: &str) -> CriResult<bool> {
        Ok(self.image(image)?.is_some())
    }

    /// ImageStatus: the image, if the node has it.
    pub fn image(&mut self, image: &str) -> CriResult<Option<cri::Image>> {
        let req = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        };
        let r = self.rt.block_on(self.images.image_status(req));
        r.map(|r| r.into_inner().image).map_err(status)
    }

    pub fn run_pod_sandbox(
        &mut self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> CriResult<String> {
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        let r = self.rt.block_on(self.runtime.run_pod_sandbox(req));
        r.map(|r| r.into_inner().pod_sandbox_id).map_err(status)
    }

    pub fn create_container(
        &mut self,
        pod_id: &str,
        config: cri::ContainerConfig,
        pod: &PodSandboxConfig,
    ) -> CriResult<String> {
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        };
        let r = self.rt.block_on(self.runtime.create_container(req));
        r.map(|r| r.into_inner().container_id).map_err(status)
    }

    pub fn start_container(&mut self, id: &str) -> CriResult<()> {
        let req = cri::StartContainerRequest {
            container_id: id.to_string(),
        };
        self.rt
            .block_on(self.runtime.start_container(req))
            .map(drop)
            .map_err(status)
    }

    pub fn container_status(&mut self, id: &str) -> CriResult<cri::ContainerStatus> {
        let req = cri::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        let r = self.rt.block_on(self.runtime.container_status(req));
        r.map_err(status)?
            .into_inner()
            .status
            .ok_or_else(|| "no status".to_string())
    }

    /// Runs `cmd` in the container; returns (exit code, stdout, stderr).
    pub fn exec_sync(&mut self, id: &str, cmd: &[&str]) -> CriResult<(i32, String, String)> {
        let req = cri::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 30,
        };
        let r = self
            .rt
            .block_on(self.runtime.exec_sync(req))
            .map_err(status)?;
        let r = r.into_inner();
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    pub fn stop_container(&mut self, id: &str, timeout_secs: i64) -> CriResult<()> {
        retry_on_closed_shim_connection("StopContainer", || {
            let req = cri::StopContainerRequest {
                container_id: id.to_string(),
                timeout: timeout_secs,
            };
            self.rt
                .block_on(self.runtime.stop_container(req))
                .map(drop)
                .map_err(status)
        })
    }

    pub fn remove_container(&mut self, id: &str) -> CriResult<()> {
        let req = cri::RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.rt
            .block_on(self.runtime.remove_container(req))
            .map(drop)
            .map_err(status)
    }

    pub fn stop_pod_sandbox(&mut self, id: &str) -> CriResult<()> {
        retry_on_closed_shim_connection("StopPodSandbox", || {
            let req = cri::StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            };
            self.rt
                .block_on(self.runtime.stop_pod_sandbox(req))
                .map(drop)
                .map_err(status)
        })
    }

    pub fn remove_pod_sandbox(&mut self, id: &str) -> CriResult<()> {
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.rt
            .block_on(self.runtime.remove_pod_sandbox(req))
            .map(drop)
            .map_err(status)
    }

    /// The pod's IP, as the kubelet reports it (PodSandboxStatus).
    pub fn pod_ip(&mut self, pod_id: &str) -> CriResult<String> {
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_string(),
            verbose: false,
        };
        let st = self
            .rt
            .block_on(self.runtime.pod_sandbox_status(req))
            .map_err(status)?
            .into_inner();
        st.status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| format!("pod {pod_id} has no IP"))
    }

    /// ListContainers: every container this node knows, any state.
    pub fn list_containers(&mut self) -> CriResult<Vec<cri::Container>> {
        let req = cri::ListContainersRequest { filter: None };
        self.rt
            .block_on(self.runtime.list_containers(req))
            .map(|r| r.into_inner().containers)
            .map_err(status)
    }

    /// ListPodSandbox: every pod this node knows.
    pub fn list_pods(&mut self) -> CriResult<Vec<cri::PodSandbox>> {
        let req = cri::ListPodSandboxRequest { filter: None };
        self.rt
            .block_on(self.runtime.list_pod_sandbox(req))
            .map(|r| r.into_inner().items)
            .map_err(status)
    }

    /// CheckpointContainer, as the kubelet's checkpoint API calls it.
    pub fn checkpoint_container(&mut self, id: &str, location: &Path) -> CriResult<()> {
        let req = cri::CheckpointContainerRequest {
            container_id: id.to_string(),
            location: location.display().to_string(),
            timeout: 600,
        };
        self.rt
            .block_on(self.runtime.checkpoint_container(req))
            .map(drop)
            .map_err(status)
    }
}

/// A pod config the way the kubelet fills it in, in namespace `default`.
pub fn pod_config(
    name: &str,
    uid: &str,
    annotations: &[(&str, &str)],
    host_network: bool,
) -> PodSandboxConfig {
    pod_config_in("default", name, uid, annotations, host_network)
}

/// A pod config in Kubernetes namespace `namespace`.
pub fn pod_config_in(
    namespace: &str,
    name: &str,
    uid: &str,
    annotations: &[(&str, &str)],
    host_network: bool,
) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.to_string(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        // No UTS namespace with the host's network: the kubelet sends none.
        hostname: if host_network {
            String::new()
        } else {
            name.to_string()
        },
        log_directory: String::new(),
        annotations: to_map(annotations),
        labels: HashMap::new(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: if host_network {
                        cri::NamespaceMode::Node as i32
                    } else {
                        cri::NamespaceMode::Pod as i32
                    },
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container config: `image`, and `command` (empty: the image's entrypoint).
pub fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

fn to_map(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
