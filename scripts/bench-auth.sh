#!/usr/bin/env bash
# Benchmarks what auth costs a gateway: two kvmesh all-in-ones on this machine, one
# with auth disabled and one with auth enabled, loaded in turn by the same load
# generator (loadtest/) in one run. With auth on, every request carries the token of
# a user that is not root and holds READWRITE on every key, so each request pays the
# token check and the permission check (root would skip the latter).
#
# The load generator authenticates each of its connections once before the run (as
# etcd's benchmark --user does). bcrypt's cost is lowered to 4 on both servers so those
# 100 password checks (about 60 ms of CPU each at etcd's default cost 10) do not drown
# the per-request cost in the CPU figures; requests never hash a password.
#
#   scripts/bench-auth.sh [ROUNDS [FILTER]]   (default 3 rounds; prints a Markdown
#                                              table of medians; FILTER as bench.sh's)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-3}
filter=${2:-}
go build -o .bin/kvmesh ./services/kvmesh
go build -o .bin/loadtest ./loadtest
command -v etcdctl >/dev/null || { apt-get update -qq && apt-get install -y -qq etcd-client >/dev/null; }
dir=$(mktemp -d /tmp/kvmesh-bench-auth.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$dir"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A port pid
for target in off on; do
	cp=$(free_port) ip=$(free_port)
	KVMESH_REPLICA_DATA_DIR="$dir/$target" KVMESH_GATEWAY_LISTEN="127.0.0.1:$cp" KVMESH_REPLICA_LISTEN="127.0.0.1:$ip" \
		KVMESH_REPLICA_PEER_URLS="http://127.0.0.1:$ip" KVMESH_REPLICA_AUTH_BCRYPT_COST=4 KVMESH_LOG_LEVEL=warn .bin/kvmesh >"$dir/$target.log" 2>&1 &
	pid[$target]=$!
	pids+=($!)
	port[$target]=$cp
	for _ in $(seq 100); do curl -sf "http://127.0.0.1:$cp/health" >/dev/null && break; sleep 0.1; done
	curl -sf "http://127.0.0.1:$cp/health" >/dev/null || { echo "kvmesh ($target) did not start" >&2; exit 1; }
	ETCDCTL_API=3 etcdctl --endpoints="127.0.0.1:$cp" put foo bar >/dev/null
done
ctl() { ETCDCTL_API=3 etcdctl --endpoints="127.0.0.1:${port[on]}" "$@" >/dev/null; }
ctl user add root:rootpw
ctl user grant-role root root
ctl user add bench:benchpw
ctl role add all
ctl role grant-permission all readwrite --from-key ''
ctl user grant-role bench all
ctl auth enable

workloads=(
	"put, 100 conns / 1000 clients|--conns=100 --clients=1000 put --key-size=8 --val-size=256 --sequential-keys --total=100000"
	"range serializable, 100 / 1000|--conns=100 --clients=1000 range foo --consistency=s --total=100000"
	"range linearizable, 100 / 1000|--conns=100 --clients=1000 range foo --consistency=l --total=100000"
)
results="$dir/results.tsv"
: >"$results"
for round in $(seq "$rounds"); do
	for w in "${workloads[@]}"; do
		name=${w%%|*}
		args=${w#*|}
		[[ -z $filter || $name =~ $filter ]] || continue
		for target in off on; do
			user=()
			[[ $target == on ]] && user=(--user=bench:benchpw)
			before=$(awk '{print $14+$15}' "/proc/${pid[$target]}/stat")
			# shellcheck disable=SC2086
			json=$(.bin/loadtest --endpoints="127.0.0.1:${port[$target]}" --target-name="auth-$target" "${user[@]}" --json $args 2>/dev/null)
			after=$(awk '{print $14+$15}' "/proc/${pid[$target]}/stat")
			python3 - "$round" "$name" "$target" "$json" "$((after - before))" "$(getconf CLK_TCK)" >>"$results" <<'PY'
import json, sys
r = json.loads(sys.argv[4])
cpu_us = int(sys.argv[5]) / int(sys.argv[6]) * 1e6 / max(r["succeeded"], 1)
print("\t".join([sys.argv[1], sys.argv[2], sys.argv[3], str(r["requests_per_sec"]), str(r["latency_seconds"]["average"]), str(r["failed"]), str(cpu_us)]))
PY
			echo "round $round: $name: auth $target done" >&2
		done
	done
done
python3 - "$results" "$rounds" <<'PY'
import statistics, sys
from collections import defaultdict
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
qps, avg, cpu, failed, names = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(int), []
for _, name, target, q, a, f, c in rows:
    if name not in names:
        names.append(name)
    qps[name, target].append(float(q)); avg[name, target].append(float(a)); cpu[name, target].append(float(c)); failed[name, target] += int(f)
m = statistics.median
print(f"Medians of {sys.argv[2]} alternating rounds.\n")
print("| workload | auth off req/s | auth on req/s | throughput on/off | CPU/req off | CPU/req on | CPU on/off | failed (off/on) |")
print("|---|---|---|---|---|---|---|---|")
for n in names:
    off, on = m(qps[n, "off"]), m(qps[n, "on"])
    print(f"| {n} | {off:,.0f} | {on:,.0f} | **{on/off:.2f}×** | {m(cpu[n,'off']):.0f} µs | {m(cpu[n,'on']):.0f} µs | **{m(cpu[n,'on'])/m(cpu[n,'off']):.2f}×** | {failed[n,'off']}/{failed[n,'on']} |")
PY
