# Sourced by hack scripts: a throwaway containerd 2.x with its own root,
# state, socket and config, that finds containerd-shim-criu-v2 in
# $CRIU_SHIM_PREFIX/bin (or SHIM_DIR when set).
#   cd_start DIR        start a daemon under DIR (sets CD_DIR, CD_PID)
#   cd_ctr ARGS...      ctr against it (namespace "bench" unless CD_NS)
#   cd_stop             stop it and remove DIR
PREFIX=${CRIU_SHIM_PREFIX:-/opt/criu-shim}
CD_NS=${CD_NS:-bench}

cd_start() {
  CD_DIR=$1
  mkdir -p "$CD_DIR/bin"
  if [ -n "${SHIM_DIR:-}" ]; then ln -sf "$SHIM_DIR/containerd-shim-criu-v2" "$CD_DIR/bin/"; fi
  cat >"$CD_DIR/config.toml" <<TOML
version = 3
root = "$CD_DIR/root"
state = "$CD_DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri",
  "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images",
  "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.sandbox.controller.v1.shim"]
[grpc]
  address = "$CD_DIR/containerd.sock"
[ttrpc]
  address = "$CD_DIR/containerd.sock.ttrpc"
TOML
  PATH="$CD_DIR/bin:$PREFIX/bin:$PATH" "$PREFIX/bin/containerd" --config "$CD_DIR/config.toml" \
    >"$CD_DIR/containerd.log" 2>&1 &
  CD_PID=$!
  for _ in $(seq 100); do cd_ctr version >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "containerd did not start; see $CD_DIR/containerd.log" >&2
  return 1
}

cd_ctr() { "$PREFIX/bin/ctr" --address "$CD_DIR/containerd.sock" -n "$CD_NS" "$@"; }

cd_stop() {
  local id
  for id in $(cd_ctr task ls -q 2>/dev/null); do cd_ctr task kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
  sleep 0.5
  for id in $(cd_ctr task ls -q 2>/dev/null); do cd_ctr task delete "$id" >/dev/null 2>&1 || true; done
  for id in $(cd_ctr container ls -q 2>/dev/null); do cd_ctr container rm "$id" >/dev/null 2>&1 || true; done
  kill "$CD_PID" 2>/dev/null || true
  wait "$CD_PID" 2>/dev/null || true
  umount -R -l "$CD_DIR/state" 2>/dev/null || true
  rm -rf "$CD_DIR"
}
