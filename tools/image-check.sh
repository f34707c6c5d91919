#!/usr/bin/env bash
# tools/image-check.sh: build the image without a Docker daemon, then smoke-run its entrypoint.
#
# No container registry is reachable here, so the base image is a Debian bookworm rootfs with
# Python 3.11 (mmdebstrap), built once and cached in buildah's storage. The app image is built
# from the project's Dockerfile with buildah (vfs storage, chroot isolation). The smoke run starts
# the image's entrypoint as uid 10001, as PID 1 in its own PID namespace, against a real control
# plane on 127.0.0.1: it must register, serve /metrics that promtool accepts, and exit 0 on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
WORK="$ROOT/.tools/image"
BASE="localhost/delegate-agent-base:bookworm-python3.11"
IMAGE="localhost/delegate-agent:check"
B=(buildah --storage-driver=vfs)
mkdir -p "$WORK"
start=$(date +%s)

need=()
for tool in buildah mmdebstrap unshare promtool; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ "${#need[@]}" -gt 0 ]; then
  echo "image-check: installing buildah, mmdebstrap, prometheus (promtool)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah crun fuse-overlayfs \
    mmdebstrap uidmap util-linux prometheus >/dev/null
  pkill -x prometheus 2>/dev/null || true
fi

if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "image-check: building the base rootfs (Debian bookworm, python3.11) with mmdebstrap"
  mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates,passwd \
    bookworm "$WORK/rootfs.tar" http://deb.debian.org/debian
  ctr=$("${B[@]}" from scratch)
  "${B[@]}" add "$ctr" "$WORK/rootfs.tar" / >/dev/null
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /usr/bin/python3 "$ctr"
  "${B[@]}" commit --quiet "$ctr" "$BASE" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
  rm -f "$WORK/rootfs.tar"
fi

echo "image-check: building $IMAGE from the Dockerfile"
# TLS to PyPI goes through this machine's proxy: lend the build the host's CA bundle (not kept in the image).
printf '[global]\ncert = /etc/ssl/certs/host-ca.crt\ndisable-pip-version-check = true\n' > "$WORK/pip.conf"
"${B[@]}" bud --quiet --isolation=chroot --network=host --pull=never --layers=false \
  --build-arg "PYTHON_IMAGE=$BASE" --build-arg "REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo dev)" \
  -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/host-ca.crt:ro -v "$WORK/pip.conf:/etc/pip.conf:ro" \
  -t "$IMAGE" . >/dev/null

config() { "${B[@]}" inspect --type image "$IMAGE" | python3 -c "import json,sys; print(json.dumps(json.load(sys.stdin)['OCIv1']['config'].get('$1'), separators=(',', ':')))"; }
user=$(config User | tr -d '"')
entry=$(config Entrypoint)
[ "$user" = "10001:10001" ] || { echo "image-check: image user is '$user', not 10001:10001" >&2; exit 1; }
[ "$entry" = '["delegate-agent","run"]' ] || { echo "image-check: entrypoint is $entry" >&2; exit 1; }
if "${B[@]}" run --isolation=chroot "$IMAGE" sh -c 'command -v gcc || command -v cc || command -v pip' 2>/dev/null; then
  echo "image-check: build tools found in the runtime image" >&2; exit 1
fi

echo "image-check: smoke run of the entrypoint as uid 10001, PID 1 in its own namespace"
ctr=$("${B[@]}" from "$IMAGE")
mnt=$("${B[@]}" mount "$ctr")
cleanup() {
  [ -n "${cp_pid:-}" ] && kill "$cp_pid" 2>/dev/null || true
  [ -n "${agent_pid:-}" ] && kill -9 "$agent_pid" 2>/dev/null || true
  "${B[@]}" umount "$ctr" >/dev/null 2>&1 || true
  "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cp_dir=$(mktemp -d)
cp_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
agent_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.venv/bin/delegate-agent control-plane --listen "127.0.0.1:$cp_port" --data-dir "$cp_dir" --log-format json \
  > "$WORK/control-plane.log" 2>&1 &
cp_pid=$!
for _ in $(seq 100); do [ -s "$cp_dir/delegate-token" ] && break; sleep 0.1; done
install -D -m 0444 "$cp_dir/delegate-token" "$mnt/run/delegate-token"
unshare --fork --kill-child --pid --mount --mount-proc="$mnt/proc" \
  chroot --userspec=10001:10001 "$mnt" /usr/bin/env -i PATH=/opt/delegate-agent/bin:/usr/bin:/bin \
  MANAGER_HOST_AND_PORT="http://127.0.0.1:$cp_port" DELEGATE_TOKEN_FILE=/run/delegate-token \
  DELEGATE_NAME=image-smoke AGENT_HTTP_LISTEN="127.0.0.1:$agent_port" AGENT_DATA_DIR=/var/lib/delegate-agent \
  AGENT_LOG_FORMAT=json AWS_EC2_METADATA_DISABLED=true delegate-agent run > "$WORK/agent.log" 2>&1 &
agent_pid=$!
ready=""
for _ in $(seq 200); do
  if curl -fs "http://127.0.0.1:$agent_port/readyz" >/dev/null 2>&1; then ready=yes; break; fi
  sleep 0.1
done
[ -n "$ready" ] || { echo "image-check: the delegate never became ready" >&2; cat "$WORK/agent.log" >&2; exit 1; }
curl -fs "http://127.0.0.1:$agent_port/metrics" | promtool check metrics
curl -fs "http://127.0.0.1:$agent_port/status" | grep -q '"state": *"running"'
inner=$(pgrep -P "$agent_pid" | head -1)
[ "$(ps -o uid= -p "$inner" | tr -d ' ')" = "10001" ] || { echo "image-check: not running as uid 10001" >&2; exit 1; }
kill -TERM "$inner"
rc=0; wait "$agent_pid" || rc=$?
agent_pid=""
[ "$rc" -eq 0 ] || { echo "image-check: SIGTERM as PID 1 exited $rc" >&2; cat "$WORK/agent.log" >&2; exit 1; }
grep -q '"agent.deregistered"' "$WORK/agent.log" || { echo "image-check: no deregistration" >&2; exit 1; }
size=$("${B[@]}" images --format '{{.Size}}' "$IMAGE" 2>/dev/null | head -1)
echo "image-check: OK in $(( $(date +%s) - start ))s (image $IMAGE, $size)"
