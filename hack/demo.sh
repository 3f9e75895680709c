#!/usr/bin/env bash
# make demo: builds the demo program and runs it (as root). Everything it
# starts lives under one temp dir and is removed on exit, Ctrl-C or failure.
# Flags go to the program: ./hack/demo.sh --images 6 --image-mb 60
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "make demo needs root (private containerd, mounts, FUSE): run it with sudo" >&2
  exit 2
fi
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || { echo "==> installing runc"; apt-get install -y runc >/dev/null; }
export DUPSNAP_BIN="$PWD/bin/dupsnap" DUPPROXY_BIN="$PWD/bin/dupproxy" DUPSNAP_TOOLS="$PWD/_tools/bin"
mkdir -p bin
echo "==> building the demo program"
CGO_ENABLED=0 go build -o bin/dupdemo ./integration/cmd/dupdemo
# exec: Ctrl-C goes straight to the program, which cleans up after itself.
exec ./bin/dupdemo "$@"
