#!/usr/bin/env bash
# Takes docs/img/dashboard.png: the chart's Grafana dashboard drawn from real
# data. Three registry-proxy nodes (bin/registry-proxy) on loopback in front
# of the test registry (cmd/testregistry), Prometheus scraping their /metrics
# every 2 s, images pulled through the nodes for a few minutes as containerd
# pulls them (the manifest by tag, then the blobs by digest); then
# cmd/dashboard-render runs the dashboard's queries against Prometheus and
# headless Chromium takes the picture of the page it draws. Needs
# `scripts/install-deps.sh dashboard` (make dashboard-shot runs it).
#
# OUT=FILE (docs/img/dashboard.png), ROUNDS=N (8), BASE_PORT=P (39100: the
# ports P..P+50 on 127.0.0.1 must be free), KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-docs/img/dashboard.png}
ROUNDS=${ROUNDS:-8}
BASE_PORT=${BASE_PORT:-39100}
NODES=3
REGISTRY=registry.demo.invalid
LAYERS=4MiB,24MiB,64MiB

REG_PORT=$BASE_PORT CONTROL_PORT=$((BASE_PORT + 2)) PROM_PORT=$((BASE_PORT + 3))
mirror_port() { echo $((BASE_PORT + 10 * $1)); }
admin_port() { echo $((BASE_PORT + 10 * $1 + 1)); }
peer_port() { echo $((BASE_PORT + 10 * $1 + 2)); } # gossip: the next port

ports=($REG_PORT $((REG_PORT + 1)) $CONTROL_PORT $PROM_PORT)
for i in $(seq $NODES); do
	ports+=("$(mirror_port "$i")" "$(admin_port "$i")" "$(peer_port "$i")" $(($(peer_port "$i") + 1)))
done
for p in "${ports[@]}"; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
		echo "dashboard-shot: 127.0.0.1:$p is taken; set BASE_PORT" >&2
		exit 1
	fi
done

work=$(mktemp -d /tmp/dashboard-shot.XXXXXX)
pids=()
cleanup() {
	for pid in "${pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if [ "${KEEP:-}" = 1 ]; then
		echo "dashboard-shot: work directory $work kept"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT

# wait_for URL: until it answers 200, 60 s at most.
wait_for() {
	for _ in $(seq 120); do
		curl -sf -o /dev/null "$1" && return 0
		sleep 0.5
	done
	echo "dashboard-shot: $1 did not answer" >&2
	return 1
}

echo "dashboard-shot: building into $work"
make -s build
go build -o "$work/testregistry" ./cmd/testregistry
go build -o "$work/dashboard-render" ./cmd/dashboard-render

"$work/testregistry" --listen "127.0.0.1:$REG_PORT" --control "127.0.0.1:$CONTROL_PORT" --blob 1MiB >"$work/testregistry.json" 2>"$work/testregistry.log" &
pids+=($!)
for _ in $(seq 120); do
	[ -s "$work/testregistry.json" ] && break
	sleep 0.5
done

bin/registry-proxy secret >"$work/cluster-secret"
# A paced download and a small store, so that downloads overlap scrapes and
# garbage collection runs during the pulls; containerd's content store off
# (no containerd here).
cat >"$work/node.toml" <<EOF
[download]
rate = "80MB"
[store]
high_water = "200MiB"
gc_interval = "20s"
[containerd]
address = ""
EOF
targets=""
for i in $(seq $NODES); do
	join=()
	[ "$i" -gt 1 ] && join=(--join "127.0.0.1:$(peer_port 1)")
	bin/registry-proxy serve --config "$work/node.toml" --listen "127.0.0.1:$(mirror_port "$i")" \
		--admin-listen "127.0.0.1:$(admin_port "$i")" --peer-listen "127.0.0.1:$(peer_port "$i")" "${join[@]}" \
		--node-id "node-$i" --cluster-secret "$work/cluster-secret" --data-dir "$work/node-$i" \
		--upstream "$REGISTRY=http://127.0.0.1:$REG_PORT" --log-format json 2>"$work/node-$i.log" &
	pids+=($!)
	targets+="      - targets: ['127.0.0.1:$(admin_port "$i")']
        labels: {instance: node-$i}
"
done
for i in $(seq $NODES); do
	wait_for "http://127.0.0.1:$(admin_port "$i")/readyz"
done

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 2s
  evaluation_interval: 2s
scrape_configs:
  - job_name: registry-proxy
    static_configs:
$targets
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
	--web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn 2>"$work/prometheus.log" &
pids+=($!)
wait_for "http://127.0.0.1:$PROM_PORT/-/ready"

start=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "dashboard-shot: Prometheus on 127.0.0.1:$PROM_PORT; $ROUNDS rounds of pulls from $start"
sleep 10

accept="application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
# pull NODE TAG: the image's manifest by tag, then its blobs, as containerd
# does (three at a time).
pull() {
	local base="http://127.0.0.1:$(mirror_port "$1")/v2/demo/app" cp=() d
	curl -sf -o /dev/null -H "Accept: $accept" "$base/manifests/$2?ns=$REGISTRY" || echo "dashboard-shot: node-$1 manifest $2 failed" >&2
	for d in $(jq -r '.Config, .Layers[].Digest' "$work/$2.json"); do
		curl -sf -o /dev/null "$base/blobs/$d?ns=$REGISTRY" || echo "dashboard-shot: node-$1 blob $d failed" >&2 &
		cp+=($!)
	done
	wait "${cp[@]}"
}

for k in $(seq "$ROUNDS"); do
	tag=v$k
	curl -sf -X POST -o "$work/$tag.json" "http://127.0.0.1:$CONTROL_PORT/push?repo=demo/app&tag=$tag&layers=$LAYERS&seed=$k&format=image"
	if [ $((k % 2)) = 1 ]; then
		# A rollout: every node pulls the new image at once.
		np=()
		for i in $(seq $NODES); do
			pull "$i" "$tag" &
			np+=($!)
		done
		wait "${np[@]}"
	else
		# One node first, the others once it has it.
		first=$(((k / 2) % NODES + 1))
		pull "$first" "$tag"
		np=()
		for i in $(seq $NODES); do
			[ "$i" = "$first" ] && continue
			pull "$i" "$tag" &
			np+=($!)
		done
		wait "${np[@]}"
	fi
	# Pulled again: served from the store.
	pull 1 "$tag"
	# A digest nobody has: 404.
	curl -s -o /dev/null "http://127.0.0.1:$(mirror_port 2)/v2/demo/app/blobs/sha256:$(printf '%064d' "$k")?ns=$REGISTRY" || true
	if [ "$k" = 5 ]; then
		# The registry refuses connections for 12 s while every node is
		# asked for a tag each 2 s: tags are answered from the cluster's
		# last resolution (stale answers).
		curl -sf -X POST -o /dev/null "http://127.0.0.1:$CONTROL_PORT/outage?mode=refuse"
		for _ in $(seq 6); do
			for i in $(seq $NODES); do
				curl -s -o /dev/null -H "Accept: $accept" "http://127.0.0.1:$(mirror_port "$i")/v2/demo/app/manifests/v4?ns=$REGISTRY" || true
			done
			sleep 2
		done
		curl -sf -X POST -o /dev/null "http://127.0.0.1:$CONTROL_PORT/outage?mode="
	fi
	echo "dashboard-shot: round $k of $ROUNDS pulled"
	sleep 15
done
sleep 6 # the last scrapes
end=$(date -u +%Y-%m-%dT%H:%M:%SZ)

caption="Preview drawn by cmd/dashboard-render (not Grafana) from Prometheus $(prometheus --version 2>&1 | awk 'NR==1{print $3}') scraping $NODES registry-proxy nodes on loopback every 2 s, while make dashboard-shot pulled $ROUNDS images ($LAYERS) through them from cmd/testregistry; $(date -u +%Y-%m-%d), $(nproc) vCPU."
height=$("$work/dashboard-render" -prometheus "http://127.0.0.1:$PROM_PORT" -start "$start" -end "$end" -step 2s \
	-rate-interval 10s -width 1600 -caption "$caption" -out "$work/dashboard.html")
mkdir -p "$(dirname "$OUT")"
out=$(realpath "$(dirname "$OUT")")/$(basename "$OUT")
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
	--disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$work/chromium" \
	--screenshot="$out" --window-size="1600,$height" "file://$work/dashboard.html" 2>"$work/chromium.log"
echo "dashboard-shot: $OUT ($start – $end)"
