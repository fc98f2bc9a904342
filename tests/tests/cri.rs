//! Pods through containerd's CRI plugin, as the kubelet drives it, on the
//! `criu` runtime handler. Needs root and hack/setup.

use criu_shim_tests::cri::{container_config, pod_config};
use criu_shim_tests::{Containerd, IMAGE};

#[test]
fn a_pod_runs_on_the_criu_handler_through_the_cri() {
    let share = tempfile::tempdir().unwrap();
    let node = Containerd::cri_node(share.path());
    let mut cri = node.cri();
    let v = cri.version().unwrap();
    assert!(v.runtime_version.starts_with('2'), "{v:?}");
    assert!(cri.image_present(IMAGE).unwrap());

    let pod = pod_config("web", "uid-web-1", &[], true);
    let pod_id = cri.run_pod_sandbox(&pod, "criu").expect("RunPodSandbox");
    let ctr = container_config("app", IMAGE, &["/testapp", "--port", "18391"]);
    let id = cri
        .create_container(&pod_id, ctr, &pod)
        .expect("CreateContainer");
    cri.start_container(&id).expect("StartContainer");
    let st = cri.container_status(&id).unwrap();
    assert_eq!(
        st.state,
        criu_shim_tests::cri::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );
    let (code, out, err) = cri
        .exec_sync(&id, &["sh", "-c", "echo from-exec; exit 4"])
        .unwrap();
    assert_eq!((code, out.as_str()), (4, "from-exec\n"), "{err}");
    // The pod's containers share one shim.
    let shims = criu_shim_tests::pids_matching(&format!("-id {pod_id}"));
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");

    cri.stop_container(&id, 5).unwrap();
    cri.remove_container(&id).unwrap();
    cri.stop_pod_sandbox(&pod_id).unwrap();
    cri.remove_pod_sandbox(&pod_id).unwrap();
}
