#!/usr/bin/env bash
# Benchmarks kvmesh's all-in-one side by side with a single-node etcd (the version
# pinned in tools/etcd) on this machine, in one run, through the same load generator
# (loadtest/, which speaks the public API over gRPC like etcd's own benchmark tool).
# Workloads alternate between the two servers, ROUNDS times, and the report gives the
# median of each and the kvmesh/etcd ratio.
#
#   BENCH_CLUSTER=3 scripts/bench.sh …  runs a 3-member etcd cluster against the mesh
#                                        of docker-compose.yml instead: 3 replicas, a
#                                        NATS server, the fanout and 2 gateways, each a
#                                        process; the clients are spread over both
#                                        gateways (over the 3 members for etcd) and the
#                                        CPU is that of every process
#   BENCH_GATEWAYS=1                     the mesh with one gateway
#   BENCH_CHARTS=DIR [BENCH_CHART_PREFIX=P]
#                                        also writes the run's measurements
#                                        (Presults.tsv, Pcpu-by-role.tsv) and their
#                                        charts (Pthroughput.svg, Platency.svg,
#                                        Pcpu.svg: loadtest chart) into DIR
#   BENCH_RULER=benchmark scripts/bench.sh …
#                                        measures with etcd's own benchmark tool
#                                        (tools/etcd-benchmark, the same arguments)
#                                        instead of loadtest: the put and range
#                                        workloads
#   scripts/bench.sh [ROUNDS [FILTER]]   (default 3 rounds, every workload; prints a
#                                        Markdown table; FILTER keeps the workloads
#                                        whose name matches it, an extended regular
#                                        expression: "range", "^(put|range)")
#
# Data directories live under BENCH_DIR (default: a temporary directory on the same
# disk for both servers). Both servers run for the whole benchmark; only one is loaded
# at a time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-3}
filter=${2:-}
ruler=${BENCH_RULER:-loadtest}
[[ $ruler == loadtest || $ruler == benchmark ]] || { echo "BENCH_RULER: loadtest or benchmark, not $ruler" >&2; exit 2; }
"$root/scripts/tools.sh"
go build -o .bin/kvmesh ./services/kvmesh
go build -o .bin/loadtest ./loadtest

dir=${BENCH_DIR:-$(mktemp -d /tmp/kvmesh-bench.XXXXXX)}
mkdir -p "$dir"
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	[[ -n "${BENCH_DIR:-}" ]] || rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
members=${BENCH_CLUSTER:-1}
etcd_pids=() kvmesh_pids=() etcd_eps=() etcd_cluster="" kv_cluster="" kv_urls=""
declare -a ecp eip kip
declare -A role # process id → what it is (etcd, kvmesh, replica, gateway, fanout, nats)
for i in $(seq 0 $((members - 1))); do
	ecp[i]=$(free_port) eip[i]=$(free_port) kip[i]=$(free_port)
	etcd_cluster+="${etcd_cluster:+,}e$i=http://127.0.0.1:${eip[i]}"
	kv_cluster+="${kv_cluster:+,}k$i=http://127.0.0.1:${kip[i]}"
	kv_urls+="${kv_urls:+,}http://127.0.0.1:${kip[i]}"
	etcd_eps+=("127.0.0.1:${ecp[i]}")
done
for i in $(seq 0 $((members - 1))); do
	.bin/etcd --name "e$i" --data-dir "$dir/etcd$i" --log-level error \
		--listen-client-urls "http://127.0.0.1:${ecp[i]}" --advertise-client-urls "http://127.0.0.1:${ecp[i]}" \
		--listen-peer-urls "http://127.0.0.1:${eip[i]}" --initial-advertise-peer-urls "http://127.0.0.1:${eip[i]}" \
		--initial-cluster "$etcd_cluster" >"$dir/etcd$i.log" 2>&1 &
	etcd_pids+=($!) role[$!]=etcd
	pids+=($!)
done
ep=$(IFS=,; echo "${etcd_eps[*]}")
kp=$(free_port)
if ((members == 1)); then
	KVMESH_REPLICA_DATA_DIR="$dir/kvmesh" KVMESH_GATEWAY_LISTEN="127.0.0.1:$kp" KVMESH_REPLICA_LISTEN="127.0.0.1:${kip[0]}" \
		KVMESH_REPLICA_PEER_URLS="http://127.0.0.1:${kip[0]}" KVMESH_LOG_LEVEL=warn .bin/kvmesh >"$dir/kvmesh.log" 2>&1 &
	kvmesh_pids+=($!) role[$!]=kvmesh
	pids+=($!)
	kv_eps=127.0.0.1:$kp
	kv_ports=("$kp")
else
	go build -o .bin/kvmesh-replica ./services/replica/cmd/kvmesh-replica
	go build -o .bin/kvmesh-gateway ./services/gateway/cmd/kvmesh-gateway
	go build -o .bin/kvmesh-fanout ./services/fanout/cmd/kvmesh-fanout
	(cd libs && go build -o ../.bin/nats-server github.com/nats-io/nats-server/v2)
	np=$(free_port)
	mkdir -p "$dir/nats"
	printf 'host: 127.0.0.1\nport: %s\nmax_payload: 8MB\njetstream { store_dir: "%s" }\n' "$np" "$dir/nats" >"$dir/nats.conf"
	.bin/nats-server -c "$dir/nats.conf" >"$dir/nats.log" 2>&1 &
	kvmesh_pids+=($!) role[$!]=nats
	pids+=($!)
	for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$np") 2>/dev/null && break; sleep 0.1; done
	for i in $(seq 0 $((members - 1))); do
		KVMESH_REPLICA_NAME="k$i" KVMESH_REPLICA_DATA_DIR="$dir/kvmesh$i" KVMESH_REPLICA_LISTEN="127.0.0.1:${kip[i]}" \
			KVMESH_REPLICA_PEER_URLS="http://127.0.0.1:${kip[i]}" KVMESH_REPLICA_INITIAL_CLUSTER="$kv_cluster" \
			KVMESH_LOG_LEVEL=warn .bin/kvmesh-replica >"$dir/kvmesh$i.log" 2>&1 &
		kvmesh_pids+=($!) role[$!]=replica
		pids+=($!)
	done
	KVMESH_FANOUT_LISTEN="127.0.0.1:$(free_port)" KVMESH_FANOUT_REPLICAS="$kv_urls" KVMESH_NATS_URL="nats://127.0.0.1:$np" \
		KVMESH_LOG_LEVEL=warn .bin/kvmesh-fanout >"$dir/fanout.log" 2>&1 &
	kvmesh_pids+=($!) role[$!]=fanout
	pids+=($!)
	kv_ports=("$kp")
	for _ in $(seq 2 "${BENCH_GATEWAYS:-2}"); do kv_ports+=("$(free_port)"); done
	kv_eps=""
	for i in "${!kv_ports[@]}"; do
		KVMESH_GATEWAY_LISTEN="127.0.0.1:${kv_ports[i]}" KVMESH_GATEWAY_REPLICAS="$kv_urls" KVMESH_NATS_URL="nats://127.0.0.1:$np" \
			KVMESH_LOG_LEVEL=warn .bin/kvmesh-gateway >"$dir/gateway$i.log" 2>&1 &
		kvmesh_pids+=($!) role[$!]=gateway
		pids+=($!)
		kv_eps+="${kv_eps:+,}127.0.0.1:${kv_ports[i]}"
	done
fi
for port in "${ecp[0]}" "${kv_ports[@]}"; do
	for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
	curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "server on $port did not start" >&2; exit 1; }
done

if ((members > 1)); then
	# Nobody watches during these workloads: wait until the gateways have stopped
	# following the revision stream (KVMESH_GATEWAY_WATCH_IDLE_AFTER after their start),
	# as in a deployment whose clients do not watch; the fanout and NATS go on.
	for port in "${kv_ports[@]}"; do
		for _ in $(seq 600); do
			curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^kvmesh_gateway_watch_following 0' && break
			sleep 0.1
		done
	done
fi

# CPU time (user+system, clock ticks) each process has used so far: "pid ticks" lines.
cpu_ticks() {
	local p
	for p in "$@"; do echo "$p $(awk '{print $14+$15}' "/proc/$p/stat")"; done
}
# The range workloads read the key "foo", present on both.
curl -sf -H 'Content-Type: application/json' -d '{"key":"Zm9v","value":"YmFy"}' "http://${etcd_eps[0]}/v3/kv/put" >/dev/null
curl -sf -H 'Content-Type: application/json' -d '{"key":"Zm9v","value":"YmFy"}' "http://127.0.0.1:$kp/etcdserverpb.KV/Put" >/dev/null

# name | loadtest arguments (the same for both servers)
workloads=(
	"put, 1 conn / 1 client|--conns=1 --clients=1 put --key-size=8 --val-size=256 --total=5000"
	"put, 100 conns / 1000 clients|--conns=100 --clients=1000 put --key-size=8 --val-size=256 --sequential-keys --total=100000"
	"range serializable, 100 / 1000|--conns=100 --clients=1000 range foo --consistency=s --total=100000"
	"range linearizable, 100 / 1000|--conns=100 --clients=1000 range foo --consistency=l --total=100000"
	"lease-keepalive, 100 / 1000, one stream per client|--conns=100 --clients=1000 lease-keepalive --leases-per-client=10 --total=200000"
	"lease-keepalive once (etcd's benchmark), 100 / 1000|--conns=100 --clients=1000 lease-keepalive --once --total=50000"
	"mixed: get 50%, put 25%, CAS 15%, delete 10%, 8 conns / 8 clients|--conns=8 --clients=8 mixed --key-space-size=1000 --total=20000"
)
results="$dir/results.tsv"
cpu_by_role="$dir/cpu-by-role.tsv" # round, workload, target, role, CPU µs per request
: >"$results"
: >"$cpu_by_role"
for round in $(seq "$rounds"); do
	for w in "${workloads[@]}"; do
		name=${w%%|*}
		args=${w#*|}
		[[ -z $filter || $name =~ $filter ]] || continue
		[[ $ruler == loadtest || $name == put* || $name == range* ]] || continue
		for target in etcd kvmesh; do
			endpoints=$ep procs=("${etcd_pids[@]}")
			[[ $target == kvmesh ]] && endpoints=$kv_eps procs=("${kvmesh_pids[@]}")
			before=$(cpu_ticks "${procs[@]}")
			if [[ $ruler == loadtest ]]; then
				# shellcheck disable=SC2086
				json=$(.bin/loadtest --endpoints="$endpoints" --target-name=$target --json $args 2>/dev/null)
			else
				# etcd's benchmark prints latencies to 0.1 ms; the average is taken from
				# Little's law instead (clients / throughput, the tool's loop is closed).
				# shellcheck disable=SC2086
				json=$(.bin/etcd-benchmark --endpoints="$endpoints" $args 2>&1 | BENCH_ARGS="$args" python3 -c '
import json, os, re, sys
t = sys.stdin.read()
def num(pat):
    m = re.search(pat, t)
    return float(m.group(1)) if m else 0.0
total = num(r"Total:\s+([0-9.]+)")
rps = num(r"Requests/sec:\s+([0-9.]+)")
clients = re.search(r"--clients=(\d+)", os.environ["BENCH_ARGS"])
errs = sum(int(n) for n in re.findall(r"\[(\d+)\]", t.split("Error distribution:")[1])) if "Error distribution:" in t else 0
print(json.dumps({"requests_per_sec": rps, "succeeded": round(rps * total), "failed": errs,
    "latency_seconds": {"average": int(clients.group(1)) / rps if clients and rps else num(r"Average:\s+([0-9.]+)"), "p99": num(r"99% in ([0-9.]+)")}}))')
			fi
			after=$(cpu_ticks "${procs[@]}")
			roles=$(for p in "${procs[@]}"; do echo "$p ${role[$p]}"; done)
			python3 - "$round" "$name" "$target" "$json" "$before" "$after" "$roles" "$(getconf CLK_TCK)" "$cpu_by_role" >>"$results" <<'PY'
import json, sys
r = json.loads(sys.argv[4])
l = r["latency_seconds"]
ticks = lambda s: dict(line.split() for line in s.splitlines())
before, after, roles = ticks(sys.argv[5]), ticks(sys.argv[6]), ticks(sys.argv[7])
per_req = lambda t: t / int(sys.argv[8]) * 1e6 / max(r["succeeded"], 1)
by_role = {}
for p in after:
    by_role[roles[p]] = by_role.get(roles[p], 0) + int(after[p]) - int(before[p])
with open(sys.argv[9], "a") as f:
    for role, t in sorted(by_role.items()):
        f.write("\t".join([sys.argv[1], sys.argv[2], sys.argv[3], role, str(per_req(t))]) + "\n")
print("\t".join([sys.argv[1], sys.argv[2], sys.argv[3], str(r["requests_per_sec"]), str(l["average"]), str(l["p99"]), str(r["failed"]), str(per_req(sum(by_role.values())))]))
PY
			echo "round $round: $name: $target done" >&2
		done
	done
done

python3 - "$results" "$rounds" "$ruler" "$cpu_by_role" <<'PY'
import statistics, sys
from collections import defaultdict
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
qps, avg, p99, cpu, failed = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(int)
names = []
for _, name, target, q, a, p, f, c in rows:
    if name not in names:
        names.append(name)
    qps[name, target].append(float(q)); avg[name, target].append(float(a)); p99[name, target].append(float(p))
    cpu[name, target].append(float(c))
    failed[name, target] += int(f)
m = statistics.median
print(f"Medians of {sys.argv[2]} alternating rounds, measured by {sys.argv[3]}.\n")
print("| workload | etcd req/s | kvmesh req/s | throughput kvmesh/etcd | etcd avg | kvmesh avg | latency kvmesh/etcd | etcd p99 | kvmesh p99 | server CPU/req etcd | kvmesh | CPU kvmesh/etcd | failed (etcd/kvmesh) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for n in names:
    e, k = m(qps[n, "etcd"]), m(qps[n, "kvmesh"])
    ea, ka = m(avg[n, "etcd"]), m(avg[n, "kvmesh"])
    print(f"| {n} | {e:,.0f} | {k:,.0f} | **{k/e:.2f}×** | {ea*1000:.2f} ms | {ka*1000:.2f} ms | **{ka/ea:.2f}×** | {m(p99[n,'etcd'])*1000:.1f} ms | {m(p99[n,'kvmesh'])*1000:.1f} ms | {m(cpu[n,'etcd']):.0f} µs | {m(cpu[n,'kvmesh']):.0f} µs | **{m(cpu[n,'kvmesh'])/m(cpu[n,'etcd']):.2f}×** | {failed[n,'etcd']}/{failed[n,'kvmesh']} |")
roles = defaultdict(list)
for _, name, target, role, us in (l.rstrip("\n").split("\t") for l in open(sys.argv[4])):
    roles[name, target, role].append(float(us))
rs = sorted({r for _, t, r in roles if t == "kvmesh"})
if len(rs) > 1:
    print("\nServer CPU per request by process kind (medians, µs; all processes of a kind together):\n")
    print("| workload | etcd | " + " | ".join("kvmesh " + r for r in rs) + " |")
    print("|---|---|" + "---|" * len(rs))
    for n in names:
        print(f"| {n} | {m(roles[n, 'etcd', 'etcd']):.0f} | " + " | ".join(f"{m(roles[n, 'kvmesh', r]):.0f}" if roles[n, 'kvmesh', r] else "" for r in rs) + " |")
PY

if [[ -n ${BENCH_CHARTS:-} ]]; then
	mkdir -p "$BENCH_CHARTS"
	prefix=${BENCH_CHART_PREFIX:-}
	cp "$results" "$BENCH_CHARTS/${prefix}results.tsv"
	cp "$cpu_by_role" "$BENCH_CHARTS/${prefix}cpu-by-role.tsv"
	topology="all-in-one vs etcd"
	((members == 1)) || topology="mesh vs etcd, $members members"
	.bin/loadtest chart --out "$BENCH_CHARTS" --prefix "$prefix" --title "$topology, $ruler" "$results"
fi
