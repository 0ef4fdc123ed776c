#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian machine:
# Debian packages (containerd, runc, docker.io, iproute2, openssl, qemu-user-static
# to run the image's arm64 binary, docker-registry: distribution's proxy, the
# benchmarks' anchor), and into .tools/bin
# crictl, staticcheck, helm, kubeconform, grpcurl and a containerd 2.x daemon with its
# ctr and runc shim. Idempotent:
# what is present already is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

CONTAINERD2_VERSION=v2.4.2
TOOLS="$PWD/.tools/bin"
mkdir -p "$TOOLS"

need_pkgs=()
for p in containerd runc docker.io iproute2 procps openssl qemu-user-static docker-registry; do
	dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
# `install-deps.sh dashboard` (make dashboard-shot) also installs Prometheus,
# headless Chromium, curl and jq: the dashboard's picture is taken with them.
if [ "${1:-}" = dashboard ]; then
	for p in prometheus chromium curl jq; do
		dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
	done
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "install-deps: missing ${need_pkgs[*]}; run as root to install them" >&2
	else
		echo "install-deps: apt-get install ${need_pkgs[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
	fi
fi
# The packaged daemons are started by the tests with their own roots, not by
# the system.
if [ "$(id -u)" -eq 0 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
	systemctl disable --now docker.socket docker containerd docker-registry >/dev/null 2>&1 || true
fi

go_install() { # name module@version [tags]
	[ -x "$TOOLS/$1" ] && return 0
	echo "install-deps: go install $2"
	GOBIN="$TOOLS" go install ${3:+-tags "$3"} "$2"
}
go_install crictl sigs.k8s.io/cri-tools/cmd/crictl@v1.37.0
go_install staticcheck honnef.co/go/tools/cmd/staticcheck@v0.8.2
# The chart's tests: helm template, and kubeconform against the Kubernetes
# API schemas (built by the test from k8s.io/kubernetes' OpenAPI document).
go_install helm helm.sh/helm/v3/cmd/helm@v3.22.0
go_install kubeconform github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0
# A gRPC client for the peer port, with `registry-proxy cert`
# (docs/troubleshooting.md; integration TestCertCommand).
go_install grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3
# containerd 2.x goes under its own name so it never shadows Debian's 1.x.
if [ ! -x "$TOOLS/containerd2" ] || [ ! -x "$TOOLS/ctr2" ]; then
	tmp=$(mktemp -d)
	echo "install-deps: go install containerd $CONTAINERD2_VERSION"
	GOBIN="$tmp" go install -tags no_btrfs,no_devmapper,no_zfs \
		"github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD2_VERSION" \
		"github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD2_VERSION"
	mv "$tmp/containerd" "$TOOLS/containerd2"
	mv "$tmp/ctr" "$TOOLS/ctr2"
	rm -rf "$tmp"
fi
# Its runc shim, in a directory of its own that the tests put first on the
# daemon's PATH (Debian's /usr/bin/containerd-shim-runc-v2 is 1.x's).
if [ ! -x "$PWD/.tools/containerd2-shim/containerd-shim-runc-v2" ]; then
	echo "install-deps: go install containerd-shim-runc-v2 $CONTAINERD2_VERSION"
	GOBIN="$PWD/.tools/containerd2-shim" go install \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD2_VERSION"
fi
