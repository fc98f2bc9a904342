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
  "$(dirname "${BASH_SOURCE[0]}")/containerd-config" "$CD_DIR" >"$CD_DIR/config.toml"
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
