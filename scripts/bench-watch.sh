#!/usr/bin/env bash
# The watch benchmarks (BENCHMARKS.md, "Watch"): loadtest's watch scenarios against
# kvmesh and a single-node etcd (the version pinned in tools/etcd) on this machine, in
# one run, through the same load generator.
#
#   scripts/bench-watch.sh [SCENARIOS]   SCENARIOS: any of spread, hot, scale, million
#                                         (default: spread, hot and scale)
#
# kvmesh is the mesh: a NATS server, one replica, the fanout, and gateways (the
# watches' memory and work are the gateways'). Every scenario starts its servers
# fresh.
#
# - spread: 100,000 watches, each on its own key, over 100 streams, on one gateway;
#   1,000 puts/s of random watched keys; delivery latency, and memory per idle watch
#   (the resident memory the gateway, or etcd, grew by).
# - hot: 100,000 watches on one key over 100 streams; the put rate rises step by step
#   until p99 delivery latency passes 1 s.
# - scale: two gateways, each held to BENCH_GATEWAY_CPU cores (default 0.5) by a CPU
#   cgroup as if on a machine of its own; the hot scenario with the watches on one
#   gateway, then spread over both.
# - million: BENCH_MILLION (default 1,000,000) watches, each on its own key and
#   created from the past (with a start revision, as Kubernetes reflectors create
#   theirs), over 1,000 streams and 100 connections: on etcd, on one gateway, and on
#   two; creation time, memory per watch, delivery at 1,000 puts/s, and the replica's
#   RPCs and CPU during the creation against an idle window as long.
#
# Data directories live under BENCH_DIR (default: a temporary directory). Every
# server is stopped at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scenarios=${1:-spread,hot,scale}
million=${BENCH_MILLION:-1000000}
watchers=${BENCH_WATCHERS:-100000}
streams=${BENCH_STREAMS:-100}
hot_rates=${BENCH_HOT_RATES:-1,1.5,2,3,4,5,6,7,8,10,12,14,16,20,24,28,32}
gw_cpu=${BENCH_GATEWAY_CPU:-0.5}

"$root/scripts/tools.sh"
go build -o .bin/loadtest ./loadtest
go build -o .bin/kvmesh-replica ./services/replica/cmd/kvmesh-replica
go build -o .bin/kvmesh-gateway ./services/gateway/cmd/kvmesh-gateway
go build -o .bin/kvmesh-fanout ./services/fanout/cmd/kvmesh-fanout
(cd libs && go build -o ../.bin/nats-server github.com/nats-io/nats-server/v2)

dir=${BENCH_DIR:-$(mktemp -d /tmp/kvmesh-bench-watch.XXXXXX)}
mkdir -p "$dir"
pids=()
cgroups=()
cleanup() {
	stop_all
	for c in "${cgroups[@]}"; do rmdir "$c" 2>/dev/null || true; done
	[[ -n "${BENCH_DIR:-}" ]] || rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_health ADDR [PATH]: waits until http://ADDR/PATH (default /health) answers.
wait_health() {
	for _ in $(seq 200); do curl -sf "http://$1${2:-/health}" >/dev/null && return 0; sleep 0.1; done
	echo "nothing healthy on $1" >&2
	exit 1
}
# start_etcd NAME: starts a fresh single-node etcd; sets pid and ep.
start_etcd() {
	local cp pp
	cp=$(free_port) pp=$(free_port)
	.bin/etcd --name "$1" --data-dir "$dir/$1" --log-level error \
		--listen-client-urls "http://127.0.0.1:$cp" --advertise-client-urls "http://127.0.0.1:$cp" \
		--listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
		--initial-cluster "$1=http://127.0.0.1:$pp" >"$dir/$1.log" 2>&1 &
	pid=$! ep=127.0.0.1:$cp
	pids+=("$pid")
	wait_health "$ep"
}

# start_mesh NAME GATEWAYS [CPU]: starts a fresh mesh: a NATS server, one replica, the
# fanout and GATEWAYS gateways, each held to CPU cores by a cgroup of its own when CPU
# is given. Sets pid (the first gateway's), ep (its address) and gws (all addresses).
start_mesh() {
	local name=$1 n=$2 cpu=${3:-} np rp g gp
	np=$(free_port) rp=$(free_port)
	printf 'host: 127.0.0.1\nport: %s\nmax_payload: 8MB\njetstream { store_dir: "%s" }\n' "$np" "$dir/$name/nats" >"$dir/$name.nats.conf"
	.bin/nats-server -c "$dir/$name.nats.conf" >"$dir/$name.nats.log" 2>&1 &
	pids+=($!)
	KVMESH_REPLICA_NAME=r0 KVMESH_REPLICA_DATA_DIR="$dir/$name/r0" KVMESH_REPLICA_LISTEN="127.0.0.1:$rp" \
		KVMESH_REPLICA_PEER_URLS="http://127.0.0.1:$rp" KVMESH_REPLICA_INITIAL_CLUSTER="r0=http://127.0.0.1:$rp" \
		KVMESH_LOG_LEVEL=warn .bin/kvmesh-replica >"$dir/$name.r0.log" 2>&1 &
	pids+=($!)
	rep_pid=$! rep_ep=127.0.0.1:$rp
	wait_health "127.0.0.1:$rp" /metrics
	KVMESH_FANOUT_REPLICAS="http://127.0.0.1:$rp" KVMESH_NATS_URL="nats://127.0.0.1:$np" KVMESH_LOG_LEVEL=warn \
		.bin/kvmesh-fanout >"$dir/$name.fanout.log" 2>&1 &
	pids+=($!)
	gws=() gw_pids=()
	for g in $(seq 0 $((n - 1))); do
		gp=$(free_port)
		cg=""
		[[ -z $cpu ]] || cg_new "$name-gw$g" "$cpu"
		(
			if [[ -n $cg ]]; then
				echo "$BASHPID" >"$cg/cgroup.procs"
			fi
			KVMESH_GATEWAY_LISTEN="127.0.0.1:$gp" KVMESH_GATEWAY_REPLICAS="http://127.0.0.1:$rp" \
				KVMESH_NATS_URL="nats://127.0.0.1:$np" KVMESH_LOG_LEVEL=warn exec .bin/kvmesh-gateway
		) >"$dir/$name.gw$g.log" 2>&1 &
		pids+=($!)
		gw_pids+=($!)
		((g > 0)) || pid=$!
		gws+=("127.0.0.1:$gp")
		wait_health "127.0.0.1:$gp"
	done
	ep=${gws[0]}
}

# cg_new NAME CPU: makes a CPU cgroup (v2, or v1's cpu controller) that holds its
# processes to CPU cores; sets cg.
cg_new() {
	local d period=100000 quota
	quota=$(python3 -c "print(int($2 * 100000))")
	if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
		d=/sys/fs/cgroup/kvmesh-bench-$1
		mkdir -p "$d"
		echo "$quota $period" >"$d/cpu.max"
	else
		d=/sys/fs/cgroup/cpu/kvmesh-bench-$1
		mkdir -p "$d"
		echo "$period" >"$d/cpu.cfs_period_us"
		echo "$quota" >"$d/cpu.cfs_quota_us"
	fi
	cgroups+=("$d")
	cg=$d
}

# stop_all: stops every server started so far.
stop_all() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	pids=()
}

# load NAME ARGS…: one loadtest run; its JSON report goes to $dir/NAME.json and its
# text report to stderr.
load() {
	local name=$1
	shift
	echo "== $name" >&2
	.bin/loadtest --json "$@" >"$dir/$name.json"
}

IFS=, read -ra want <<<"$scenarios"
has() { [[ " ${want[*]} " == *" $1 "* ]]; }

if has spread; then
	start_etcd spread-etcd
	load spread-etcd --endpoints="$ep" --conns=10 --target-name=etcd watch \
		--watchers="$watchers" --streams="$streams" --rates=1000 --step=30s --settle=10s --server-pids="$pid"
	stop_all
	start_mesh spread-kvmesh 1
	load spread-kvmesh --endpoints="$ep" --conns=10 --target-name="kvmesh gateway" watch \
		--watchers="$watchers" --streams="$streams" --rates=1000 --step=30s --settle=10s --server-pids="$pid"
	stop_all
fi

if has hot; then
	start_etcd hot-etcd
	load hot-etcd --endpoints="$ep" --conns=10 --target-name=etcd watch --hot \
		--watchers="$watchers" --streams="$streams" --rates="$hot_rates" --step=10s --max-p99=1s
	stop_all
	start_mesh hot-kvmesh 1
	load hot-kvmesh --endpoints="$ep" --conns=10 --target-name="kvmesh gateway" watch --hot \
		--watchers="$watchers" --streams="$streams" --rates="$hot_rates" --step=10s --max-p99=1s
	stop_all
fi

if has scale; then
	start_mesh scale 2 "$gw_cpu"
	load scale-1 --endpoints="${gws[0]}" --conns=10 --target-name="1 gateway" watch --hot --prefix=/scale1/ \
		--watchers="$watchers" --streams="$streams" --rates="$hot_rates" --step=10s --max-p99=1s
	load scale-2 --endpoints="${gws[0]},${gws[1]}" --conns=10 --target-name="2 gateways" watch --hot --prefix=/scale2/ \
		--watchers="$watchers" --streams="$streams" --rates="$hot_rates" --step=10s --max-p99=1s
	stop_all
fi

if has million; then
	margs=(watch --from-past --watchers="$million" --streams=1000 --rates=1000 --step=30s --drain=30s --settle=10s)
	start_etcd million-etcd
	load million-etcd --endpoints="$ep" --conns=100 --target-name=etcd "${margs[@]}" --server-pids="$pid"
	stop_all
	start_mesh million-1 1
	load million-1 --endpoints="$ep" --conns=100 --target-name="kvmesh, 1 gateway" "${margs[@]}" --server-pids="$pid" \
		--core-metrics="http://$rep_ep/metrics" --core-pids="$rep_pid"
	stop_all
	start_mesh million-2 2
	load million-2 --endpoints="${gws[0]},${gws[1]}" --conns=100 --target-name="kvmesh, 2 gateways" "${margs[@]}" \
		--server-pids="$(IFS=,; echo "${gw_pids[*]}")" --core-metrics="http://$rep_ep/metrics" --core-pids="$rep_pid"
	stop_all
fi

python3 - "$dir" "$gw_cpu" <<'PY'
import json, os, sys
d, gw_cpu = sys.argv[1], sys.argv[2]
def load(n):
    p = os.path.join(d, n + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
def ms(v):
    return "missing" if v is None else f"{v*1000:.1f} ms"
def best(r):
    ok = [s for s in r["steps"] if s["p99_seconds"] is not None and s["p99_seconds"] < 1]
    return max(ok, key=lambda s: s["delivered_events_per_sec"]) if ok else None
ms_ = [load(n) for n in ("million-etcd", "million-1", "million-2")]
if any(ms_):
    print("\n### a million watches from the past\n")
    print("| target | watches | created in | memory per watch | puts/s | events delivered/expected | p50 | p99 | core RPCs above idle while creating | core CPU creating / idle as long |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ms_:
        if not r:
            continue
        s = r["steps"][0]
        c = r.get("core")
        rpc = f"{c['calls_above_idle']:.0f}" if c else "—"
        cpu = f"{c['create_cpu_seconds']:.2f} s / {c['idle_cpu_seconds']*c['create_seconds']/c['idle_seconds']:.2f} s" if c else "—"
        print(f"| {r['target']} | {r['watchers']} | {r['create_seconds']:.1f} s | {r['bytes_per_watcher']:.0f} B | {s['puts_per_sec']:.0f} | {s['delivered_events']}/{s['expected_events']} | {ms(s['p50_seconds'])} | {ms(s['p99_seconds'])} | {rpc} | {cpu} |")
e, k = load("spread-etcd"), load("spread-kvmesh")
if e and k:
    print("\n### spread\n")
    print("| target | created in | memory per idle watch | puts/s | events delivered/expected | p50 | p99 | max |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (e, k):
        s = r["steps"][0]
        print(f"| {r['target']} | {r['create_seconds']:.2f} s | {r['bytes_per_watcher']:.0f} B | {s['puts_per_sec']:.0f} | {s['delivered_events']}/{s['expected_events']} | {ms(s['p50_seconds'])} | {ms(s['p99_seconds'])} | {ms(s['max_seconds'])} |")
    print(f"\nmemory per idle watch kvmesh/etcd: **{k['bytes_per_watcher']/e['bytes_per_watcher']:.2f}×**")
for title, names in (("hot key", ("hot-etcd", "hot-kvmesh")), (f"scale (each gateway held to {gw_cpu} cores)", ("scale-1", "scale-2"))):
    rs = [load(n) for n in names]
    if not all(rs):
        continue
    print(f"\n### {title}\n")
    print("| target | puts/s | events/s delivered | p50 | p99 | max | missing |")
    print("|---|---|---|---|---|---|---|")
    for r in rs:
        for s in r["steps"]:
            print(f"| {r['target']} | {s['puts_per_sec']:.1f} | {s['delivered_events_per_sec']:,.0f} | {ms(s['p50_seconds'])} | {ms(s['p99_seconds'])} | {ms(s['max_seconds'])} | {s['missing_events']} |")
    b = [best(r) for r in rs]
    for r, s in zip(rs, b):
        print(f"\nhighest delivered with p99 < 1 s, {r['target']}: " + (f"**{s['delivered_events_per_sec']:,.0f} events/s** at {s['puts_per_sec']:.1f} puts/s" if s else "none"))
    if all(b):
        print(f"\nratio {rs[1]['target']} / {rs[0]['target']}: **{b[1]['delivered_events_per_sec']/b[0]['delivered_events_per_sec']:.2f}×**")
PY
