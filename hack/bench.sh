#!/usr/bin/env bash
# make bench: builds the benchmark harness and its in-container helper and
# runs every benchmark of issues 2-6 next to its baseline; the report goes
# to bench/results/. Flags go to the program, e.g.
#   make bench BENCH_FLAGS="--images 8 --reps 5"
# (--images, --image-mb, --reps, --big-mb, --small-files, --large-mb, --writes, --store-mb, --usr-files,
#  --only store,cow,proxy,nodes for a partial run;
#  ./bin/benchreport --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "make bench needs root (private containerd, mounts, FUSE): run it with sudo" >&2
  exit 2
fi
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || { echo "==> installing runc"; apt-get install -y runc >/dev/null; }
export DUPSNAP_BIN="$PWD/bin/dupsnap" DUPPROXY_BIN="$PWD/bin/dupproxy" DUPSNAP_TOOLS="$PWD/_tools/bin"
mkdir -p bin
echo "==> building the benchmark harness"
CGO_ENABLED=0 go build -o bin/benchreport ./integration/cmd/benchreport
CGO_ENABLED=0 go build -o bin/inctr ./integration/cmd/benchreport/inctr
./bin/benchreport --inctr bin/inctr "$@"

# Where the report went (--out), and whether this was a partial run (--only:
# the S3 part belongs to full runs only).
report=bench/results only=
prev=
for a in "$@"; do
  case "$a" in
    --out=*|-out=*) report=${a#*=} ;;
    --only*|-only*) only=1 ;;
  esac
  case "$prev" in --out|-out) report=$a ;; esac
  prev=$a
done

# Issue 8: blob GET throughput of dupproxy on S3 (SeaweedFS) with 1 and 2
# replicas against the local filesystem backend, appended to the report.
if [ -n "$only" ]; then
  echo "==> partial run (--only): no S3 backend benchmark"
elif [ -x _tools/bin/weed ]; then
  echo "==> dupproxy S3 backend: blob GET throughput, fs vs S3 x1/x2"
  out=$(go test -count=1 -run 'TestS3Backend/Bench' -v ./proxy/ 2>&1) || { echo "$out" | tail -30; exit 1; }
  lines=$(echo "$out" | sed -n 's/^ *s3bench_test.go:[0-9]*: //p')
  echo "$lines" > "$report/s3.txt"
  { echo; echo "## dupproxy on S3 (issue 8): blob GET throughput"; echo; echo '```'; echo "$lines"; echo '```'; } >> "$report/REPORT.md"
  echo "$lines"
else
  echo "==> skipping the S3 backend benchmark: no _tools/bin/weed (make tools-s3 builds it)"
fi
