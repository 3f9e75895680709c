#!/usr/bin/env bash
# Builds the SeaweedFS server (weed) that dupproxy's S3 backend tests run
# against into _tools/bin/weed. Its go.mod has replace directives, so
# `go install ...@version` refuses it: download the module, build inside a
# writable copy. Idempotent: skipped when the pinned version is present.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/_tools/bin"
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
stamp="$BIN/.weed-version"
if [ -x "$BIN/weed" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$SEAWEEDFS_VERSION" ]; then
  exit 0
fi
mkdir -p "$BIN"
echo "==> building SeaweedFS $SEAWEEDFS_VERSION (weed) into $BIN"
start=$(date +%s)
dir=$(go mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
[ -n "$dir" ] || { echo "cannot download github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" >&2; exit 1; }
# A fixed, writable source dir (kept): a rebuild after an interrupted one
# hits the Go build cache instead of compiling ~1700 packages again.
src="$PWD/_tools/src/seaweedfs-$SEAWEEDFS_VERSION"
if [ ! -f "$src/go.mod" ]; then
  rm -rf "$src"
  mkdir -p "$(dirname "$src")"
  cp -r "$dir" "$src.tmp"
  chmod -R u+w "$src.tmp"
  mv "$src.tmp" "$src"
fi
(cd "$src" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -o "$BIN/weed.tmp" ./weed)
mv "$BIN/weed.tmp" "$BIN/weed"
echo "$SEAWEEDFS_VERSION" > "$stamp"
echo "==> weed built in $(( $(date +%s) - start ))s"
