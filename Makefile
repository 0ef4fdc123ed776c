# registry-proxy. `make demo` runs the main job, `make test` all tests; both
# install what they need on a fresh Debian machine.

SHELL   := /bin/bash
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/registry-proxy/registry-proxy/node.Version=$(VERSION)
TOOLS   := $(CURDIR)/.tools/bin
PKGS    := ./...
# Benchmark knobs: size of the blob, repetitions.
BENCH_SIZE  ?= 1GiB
BENCH_COUNT ?= 1

.PHONY: all build image deps tools demo test unit integration lint vet staticcheck bench bench-cluster bench-lab bench-coldstart bench-containerd bench-failure-modes bench-resources bench-preheat bench-sim bench-plots dashboard-shot fuzz fmt clean proto

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/registry-proxy ./cmd/registry-proxy

# The container image: a static binary on no base image for each of
# IMAGE_PLATFORMS, under one OCI image index (one reference for nodes of any
# of them), as an OCI layout (bin/image/oci) and a tarball of it for
# `ctr images import` (bin/image/registry-proxy.tar); for `docker load`, a
# tarball per platform (bin/image/registry-proxy-linux-ARCH.tar). No daemon
# needed.
IMAGE_REF       ?= registry-proxy:$(VERSION)
IMAGE_PLATFORMS ?= linux/amd64,linux/arm64,linux/arm/v7
image:
	rm -rf bin/image/oci
	$(GO) run ./cmd/image -go $(GO) -platforms $(IMAGE_PLATFORMS) -ldflags "-s -w $(LDFLAGS)" -version $(VERSION) \
		-bin-dir bin/image -layout bin/image/oci -tar bin/image/registry-proxy.tar -docker-tar-dir bin/image -ref $(IMAGE_REF)

deps:
	$(GO) mod download

tools: deps
	./scripts/install-deps.sh

# The main job: an embedded upstream registry, a proxy, an image pulled
# through it cold and warm, and where every layer's bytes came from.
demo: deps
	$(GO) run ./cmd/demo

test: tools lint unit integration

unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /integration)

# Real daemons (containerd 1.x and 2.x, crictl, dockerd) and the binary.
integration: tools
	$(GO) test -race -count=1 -timeout 30m -v ./integration/ -tools-dir $(TOOLS)

lint: vet staticcheck

vet:
	$(GO) vet $(PKGS)

staticcheck: tools
	$(TOOLS)/staticcheck $(PKGS)

# Mirror figures, side by side with direct pulls from the same upstream and
# distribution's pull-through cache (CPU-seconds per GiB of each path), and
# a node serving peers (from its store and from containerd's). The cluster,
# cold start and preheat benchmarks have their own targets below.
bench: tools
	$(GO) test -run '^$$' -bench 'Mirror|WarmAccessCheck|Load|PeerTransfer|ServePeers|ContainerdServe|CPUPerByte' -benchtime 1x -count $(BENCH_COUNT) -timeout 60m ./integration/ -bench-size $(BENCH_SIZE)
	$(GO) test -run '^$$' -bench WritePiece -benchtime 3x ./blobstore/

# Cluster scenarios (a: all at once, b: slow parents, c: every node pulls an
# image with crictl through containerd's CRI, d: waves, e: slow parents, the owner among them) on real processes in
# network namespaces with tc limits
# (root), each in modes state, fcfs and direct, CLUSTER_RUNS times. Results:
# JSON per run, summary.md and plots under results/cluster-<time>/.
CLUSTER_NODES     ?= 8
CLUSTER_SIZE      ?= 256MiB
CLUSTER_UP        ?= 25MB
CLUSTER_ORIGIN    ?= 25MB
CLUSTER_RUNS      ?= 3
CLUSTER_SCENARIOS ?= a,b,c,d,e
# Scenario c: every node pulls with crictl through this containerd's CRI.
CLUSTER_CONTAINERD ?= 1.x
# TOML added to every proxy's configuration, say '[pieces]\nmin_size = "1MiB"'.
CLUSTER_CONFIG ?=
bench-cluster: tools
	$(GO) test -run '^$$' -bench Cluster -benchtime 1x -timeout 150m -v ./integration/ \
		-cluster-nodes $(CLUSTER_NODES) -cluster-size $(CLUSTER_SIZE) -cluster-up $(CLUSTER_UP) \
		-cluster-origin $(CLUSTER_ORIGIN) -cluster-runs $(CLUSTER_RUNS) -cluster-scenarios $(CLUSTER_SCENARIOS) \
		-cluster-containerd $(CLUSTER_CONTAINERD) -cluster-config '$(CLUSTER_CONFIG)'

# What the cluster harness's network itself costs: the same lab as
# bench-cluster, the blob's bytes relayed on the Kumar–Ross schedule over
# plain TCP (no proxy), LAB_CHUNK bytes received whole before they are passed
# on; max ÷ bound, the floor for scenario a.
LAB_CHUNK ?= 256KiB
bench-lab: tools
	$(GO) test -run '^$$' -bench LabBound -benchtime 1x -timeout 30m -v ./integration/ \
		-cluster-nodes $(CLUSTER_NODES) -cluster-size $(CLUSTER_SIZE) -cluster-up $(CLUSTER_UP) \
		-cluster-origin $(CLUSTER_ORIGIN) -cluster-runs $(CLUSTER_RUNS) -lab-chunk $(LAB_CHUNK)

# Cold start: COLD_NODES proxies in network namespaces started at the same
# instant; seconds until all see each other and are ready, and upstream
# copies of the pull that follows (root).
COLD_NODES ?= 8
COLD_RUNS  ?= 3
bench-coldstart: tools
	$(GO) test -run '^$$' -bench ColdStart -benchtime 1x -timeout 30m -v ./integration/ -cold-nodes $(COLD_NODES) -cold-runs $(COLD_RUNS)

# containerd as a source: a peer fetches a CTD_SIZE blob from a node holding
# it in its store, in containerd's files and through containerd's API, one
# after the other (root; containerd 2.x).
CTD_SIZE ?= 1GiB
bench-containerd: tools
	$(GO) test -run '^$$' -bench ContainerdServe -benchtime 1x -timeout 30m -v ./integration/ -ctd-size $(CTD_SIZE)

# docs/rollout.md's figures (root; loopback only). Failure modes: a
# containerd (FM_CONTAINERD, 1.x or 2.x) pulls through a mirror that is gone,
# hung, slow, killed or restarted mid-layer, or whose registry is down, against
# a healthy mirror and a direct pull, FM_RUNS times, each pull cut at FM_CAP.
# Resources: a node's RSS, CPU, fds and disk idle and while RES_CLIENTS
# containerds pull through it at once.
FM_CASES      ?= all
FM_RUNS       ?= 3
FM_CAP        ?= 150s
FM_CONTAINERD ?= 2.x
RES_CLIENTS   ?= 4
RES_RUNS      ?= 3
bench-failure-modes: tools build
	$(GO) test -run '^$$' -bench FailureModes -benchtime 1x -timeout 180m -v ./integration/ -tools-dir $(TOOLS) \
		-proxy-bin $(CURDIR)/bin/registry-proxy -fm-cases $(FM_CASES) -fm-runs $(FM_RUNS) -fm-cap $(FM_CAP) -fm-containerd $(FM_CONTAINERD)
bench-resources: tools build
	$(GO) test -run '^$$' -bench NodeResources -benchtime 1x -timeout 60m -v ./integration/ -tools-dir $(TOOLS) \
		-proxy-bin $(CURDIR)/bin/registry-proxy -res-clients $(RES_CLIENTS) -res-runs $(RES_RUNS)

# Preheat: PREHEAT_NODES proxies in network namespaces; `registry-proxy
# preheat` of an image of PREHEAT_LAYERS, against the Kumar–Ross bound (root).
PREHEAT_NODES  ?= 8
PREHEAT_LAYERS ?= 96MiB,64MiB,32MiB
bench-preheat: tools
	$(GO) test -run '^$$' -bench Preheat -benchtime 1x -timeout 30m -v ./integration/ -preheat-nodes $(PREHEAT_NODES) -preheat-layers $(PREHEAT_LAYERS)

# The simulator: each node's real downloader, collector, owner ranking,
# tracker and host-state meter over a simulated network, at thousands of nodes. Results under
# results/sim-<time>/. SIM_VALIDATE=<results/cluster-...> instead compares the
# simulator with a namespace run at the same setup.
SIM_NODES     ?= 100,1000,2600
SIM_SIZE      ?= 3GB
SIM_BW        ?= 300MB
SIM_SCENARIOS ?= equal,hetero,loaded
SIM_MODES     ?= state,fcfs
SIM_VALIDATE  ?=
bench-sim:
	$(GO) test -run TestSimulate -timeout 6h -v ./p2p/sim/ -sim -sim-nodes $(SIM_NODES) -sim-size $(SIM_SIZE) \
		-sim-bw $(SIM_BW) -sim-origin $(SIM_BW) -sim-scenarios $(SIM_SCENARIOS) -sim-modes $(SIM_MODES) -sim-validate "$(SIM_VALIDATE)"

# The plots of docs/benchmarks.md (docs/benchmarks/*.png), drawn from the
# headline figures in docs/benchmarks/headline.tsv; run it after editing them.
bench-plots:
	$(GO) run ./cmd/benchplots -data docs/benchmarks/headline.tsv -out docs/benchmarks

# Regenerates p2p/pb from p2p/pb/p2p.proto (the generated code is committed).
proto:
	command -v protoc >/dev/null || (apt-get update -qq && apt-get install -y -qq protobuf-compiler)
	GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
	GOBIN=$(TOOLS) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.0
	PATH=$(TOOLS):$$PATH protoc --go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative p2p/pb/p2p.proto

# docs/img/dashboard.png: the chart's Grafana dashboard drawn from real data
# (three nodes on loopback, Prometheus, pulls for a few minutes, headless
# Chromium; scripts/dashboard-shot.sh says how). Root, for the packages.
dashboard-shot:
	./scripts/install-deps.sh dashboard
	./scripts/dashboard-shot.sh

# A while on each fuzz target (their seeds run with the unit tests).
FUZZTIME ?= 30s
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParseContentRange -fuzztime $(FUZZTIME) ./proxy/upstream/
	$(GO) test -run '^$$' -fuzz FuzzBaseURL -fuzztime $(FUZZTIME) ./proxy/upstream/
	$(GO) test -run '^$$' -fuzz FuzzRequest -fuzztime $(FUZZTIME) ./proxy/
	$(GO) test -run '^$$' -fuzz FuzzParseChallenge -fuzztime $(FUZZTIME) ./proxy/upstream/
	$(GO) test -run '^$$' -fuzz FuzzDockerConfig -fuzztime $(FUZZTIME) ./proxy/upstream/
	$(GO) test -run '^$$' -fuzz FuzzParseSecrets -fuzztime $(FUZZTIME) ./p2p/trust/
	$(GO) test -run '^$$' -fuzz FuzzRegister -fuzztime $(FUZZTIME) ./p2p/swarm/
	$(GO) test -run '^$$' -fuzz FuzzPieceUpdate -fuzztime $(FUZZTIME) ./p2p/swarm/
	$(GO) test -run '^$$' -fuzz FuzzRead -fuzztime $(FUZZTIME) ./manifest/
	$(GO) test -run '^$$' -fuzz FuzzTagRecord -fuzztime $(FUZZTIME) ./p2p/manifests/
	$(GO) test -run '^$$' -fuzz FuzzRetryAfter -fuzztime $(FUZZTIME) ./proxy/upstream/
	$(GO) test -run '^$$' -fuzz FuzzParseConfig -fuzztime $(FUZZTIME) ./credprovider/
	$(GO) test -run '^$$' -fuzz FuzzCheckContainerd -fuzztime $(FUZZTIME) ./clientconfig/
	$(GO) test -run '^$$' -fuzz FuzzParseResponse -fuzztime $(FUZZTIME) ./credprovider/
	$(GO) test -run '^$$' -fuzz FuzzMatch -fuzztime $(FUZZTIME) ./credprovider/

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin
