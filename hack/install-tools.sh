#!/usr/bin/env bash
# Builds the pinned external tools the tests run for real into _tools/bin:
# containerd, ctr and containerd-shim-runc-v2 v2.4.2 and the distribution v3.1.2 registry.
# Idempotent: a tool already present at the pinned version is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/_tools/bin"
mkdir -p "$BIN"
CONTAINERD_VERSION=v2.4.2
REGISTRY_VERSION=v3.1.2
stamp="$BIN/.versions"
want="containerd=$CONTAINERD_VERSION registry=$REGISTRY_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
   [ -x "$BIN/containerd" ] && [ -x "$BIN/ctr" ] && [ -x "$BIN/containerd-shim-runc-v2" ] && [ -x "$BIN/registry" ]; then
  exit 0
fi
echo "==> building containerd $CONTAINERD_VERSION, ctr, shim and registry $REGISTRY_VERSION into $BIN"
export CGO_ENABLED=0 GOBIN="$BIN"
go install "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
           "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" \
           "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
go install "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
echo "$want" > "$stamp"
