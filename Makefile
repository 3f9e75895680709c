# dupsnap build and test entry points. `make test` is what CI runs.
GO        ?= go
BIN       := $(CURDIR)/bin
TOOLS_BIN := $(CURDIR)/_tools/bin
export PATH := $(TOOLS_BIN):$(BIN):$(PATH)
# Every test binary gets a hard deadline so a hang fails loudly instead of
# stalling CI; integration tests set their own, shorter, per-step deadlines.
TEST_TIMEOUT ?= 20m
TEST_FLAGS   ?=
BENCH_FLAGS  ?=

.PHONY: all build tools tools-s3 bench-s3 test test-unit test-integration bench demo lint fuzz clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/dupsnap ./cmd/dupsnap
	CGO_ENABLED=0 $(GO) build -o $(BIN)/dupsnap-rootfs ./cmd/dupsnap-rootfs
	CGO_ENABLED=0 $(GO) build -o $(BIN)/dupproxy ./cmd/dupproxy

tools:
	./hack/install-tools.sh

test: build tools
	DUPSNAP_BIN=$(BIN)/dupsnap DUPPROXY_BIN=$(BIN)/dupproxy DUPSNAP_TOOLS=$(TOOLS_BIN) \
		$(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(TEST_FLAGS) ./...

test-unit: build
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(TEST_FLAGS) $$($(GO) list ./... | grep -v /integration)

test-integration: build tools
	DUPSNAP_BIN=$(BIN)/dupsnap DUPPROXY_BIN=$(BIN)/dupproxy DUPSNAP_TOOLS=$(TOOLS_BIN) \
		$(GO) test -count=1 -timeout $(TEST_TIMEOUT) -v $(TEST_FLAGS) ./integration/...

bench: build tools
	./hack/bench.sh $(BENCH_FLAGS)

# SeaweedFS for dupproxy's S3 backend tests (slow to build: not part of `tools`;
# without it those tests skip). bench-s3: blob GET throughput fs vs S3 x1/x2.
tools-s3:
	./hack/install-seaweedfs.sh

bench-s3: build tools-s3
	DUPPROXY_BIN=$(BIN)/dupproxy DUPSNAP_TOOLS=$(TOOLS_BIN) $(GO) test -count=1 -run 'TestS3Backend/Bench' -v ./proxy/

demo: build tools
	./hack/demo.sh

lint:
	$(GO) vet ./...

fuzz:
	$(GO) test -run XXX -fuzz FuzzIngest -fuzztime 30s ./pkg/layout/
	$(GO) test -run XXX -fuzz FuzzManifestDecode -fuzztime 30s ./pkg/layout/

clean:
	rm -rf $(BIN)
