#!/usr/bin/env bash
# The compose smoke test: build the images, bring the mesh of docker-compose.yml up,
# use it with etcdctl through both gateways (put, get, watch), kill the leader's replica
# container and check that writes go on, restart it, scale the gateway pool, take the
# mesh down and up again and check that the data is still there, and clean up
# everything it made.
#
#   scripts/smoke.sh                 needs a Docker engine (starts dockerd if it can)
#   scripts/smoke.sh --if-possible   skips, saying so, when no engine can be started
#
# It needs no registry: the images come from scripts/images.sh, and Jaeger (an image
# from a registry) is left out unless KVMESH_JAEGER_IMAGE names one that is present,
# in which case the test also finds the trace of its put in Jaeger.
# KVMESH_SMOKE_BUILD=compose builds the images with `docker compose build` instead (a
# machine with a registry).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if_possible=false
[[ ${1:-} == --if-possible ]] && if_possible=true

say() { echo "smoke: $*" >&2; }
skip_or_fail() {
	if $if_possible; then
		say "SKIPPED: $*"
		exit 0
	fi
	say "$*"
	exit 1
}

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"

# --- A Docker engine, docker-compose and etcdctl -------------------------------------
need_apt=()
command -v docker >/dev/null 2>&1 || need_apt+=(docker.io)
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
if ((${#need_apt[@]})); then
	say "installing ${need_apt[*]} (Debian packages)"
	if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null; }; then
		skip_or_fail "could not install ${need_apt[*]}"
	fi
fi

started_dockerd=""
if ! docker info >/dev/null 2>&1; then
	say "starting dockerd"
	$sudo dockerd >/tmp/kvmesh-smoke-dockerd.log 2>&1 &
	started_dockerd=$!
	for _ in $(seq 60); do
		docker info >/dev/null 2>&1 && break
		if ! kill -0 "$started_dockerd" 2>/dev/null; then
			tail -5 /tmp/kvmesh-smoke-dockerd.log >&2
			skip_or_fail "dockerd did not start (log above)"
		fi
		sleep 0.5
	done
	docker info >/dev/null 2>&1 || skip_or_fail "dockerd did not answer within 30s"
fi

if docker compose version >/dev/null 2>&1; then
	compose_cmd=(docker compose)
else
	compose_cmd=(docker-compose)
fi
project=kvmesh-smoke-$$
# What a run that was itself killed left behind (its containers restart with dockerd
# and would hold the ports) goes first.
for stale in $(docker ps -a --format '{{.Label "com.docker.compose.project"}}' | grep '^kvmesh-smoke-[0-9]*$' | sort -u); do
	kill -0 "${stale#kvmesh-smoke-}" 2>/dev/null && continue
	say "removing $stale, left by an earlier run"
	docker ps -aq --filter "label=com.docker.compose.project=$stale" | xargs -r docker rm -f >/dev/null
	docker volume ls -q --filter "label=com.docker.compose.project=$stale" | xargs -r docker volume rm >/dev/null
	docker network ls -q --filter "label=com.docker.compose.project=$stale" | xargs -r docker network rm >/dev/null
done
# Host ports away from a developer's own mesh (2379, 22379-22388, 16686, 4317, 4318).
export KVMESH_GATEWAY_PORT=${KVMESH_SMOKE_GATEWAY_PORT:-32379}
export KVMESH_GATEWAY_POOL_PORTS=${KVMESH_SMOKE_GATEWAY_POOL_PORTS:-32380-32389}
export KVMESH_JAEGER_UI_PORT=${KVMESH_SMOKE_JAEGER_UI_PORT:-32686}
export KVMESH_JAEGER_OTLP_GRPC_PORT=${KVMESH_SMOKE_JAEGER_OTLP_GRPC_PORT:-32317}
export KVMESH_JAEGER_OTLP_HTTP_PORT=${KVMESH_SMOKE_JAEGER_OTLP_HTTP_PORT:-32318}
compose() { "${compose_cmd[@]}" -p "$project" "$@"; }

services=(nats replica-1 replica-2 replica-3 fanout gateway gateway-pool)
checked=("${services[@]}") # the services with a health check
with_jaeger=false
if [[ -n ${KVMESH_JAEGER_IMAGE:-} ]] && docker image inspect "$KVMESH_JAEGER_IMAGE" >/dev/null 2>&1; then
	with_jaeger=true
	services+=(jaeger)
else
	export KVMESH_OTLP_ENDPOINT= # no Jaeger: tracing off
fi

images=(kvmesh/nats:dev kvmesh/replica:dev kvmesh/gateway:dev kvmesh/fanout:dev kvmesh/devca:dev)
new_images=()
for img in "${images[@]}"; do
	docker image inspect "$img" >/dev/null 2>&1 || new_images+=("$img")
done

logs=$(mktemp -d)
cleanup() {
	local rc=$?
	if ((rc != 0)); then
		compose logs --no-color >"$logs/compose.log" 2>&1 || true
		say "FAILED; the mesh's logs (last 60 lines):"
		tail -60 "$logs/compose.log" >&2 || true
	fi
	[[ -n ${watch_pid:-} ]] && kill "$watch_pid" 2>/dev/null || true
	compose down -v --remove-orphans >/dev/null 2>&1 || true
	# Images this run added are removed again; ones that were here stay.
	((${#new_images[@]})) && docker rmi "${new_images[@]}" >/dev/null 2>&1 || true
	if [[ -n $started_dockerd ]]; then
		$sudo kill "$started_dockerd" 2>/dev/null || true
		wait "$started_dockerd" 2>/dev/null || true
	fi
	rm -rf "$logs"
	exit $rc
}
trap cleanup EXIT

# --- Images and the mesh ---------------------------------------------------------------
if [[ ${KVMESH_SMOKE_BUILD:-} == compose ]]; then
	say "building images with ${compose_cmd[*]} build"
	compose build "${services[@]}"
else
	scripts/images.sh
fi

# An engine that starts but cannot run containers (no overlay file system, no cgroups,
# as in some sandboxes) is no engine for this test.
if ! out=$(docker run --rm --entrypoint /kvmesh-probe kvmesh/gateway:dev 2>&1) && [[ $out != usage:* ]]; then
	echo "$out" >&2
	skip_or_fail "the Docker engine cannot run a container"
fi

wait_healthy() { # SERVICE... : every container of each service healthy, within 120s
	local deadline=$((SECONDS + 120))
	for svc in "$@"; do
		for id in $(compose ps -q "$svc"); do
			until [[ $(docker inspect -f '{{.State.Health.Status}}' "$id") == healthy ]]; do
				((SECONDS < deadline)) || {
					say "$svc ($id) is not healthy after 120s"
					return 1
				}
				sleep 1
			done
		done
	done
}

say "compose up (${services[*]})"
compose up -d --no-build "${services[@]}"
wait_healthy "${checked[@]}"

export ETCDCTL_API=3
g1=127.0.0.1:$KVMESH_GATEWAY_PORT
g2=$(compose port gateway-pool 2379)
g2=127.0.0.1:${g2##*:}
ctl() { etcdctl --dial-timeout=5s --command-timeout=15s "$@"; }
expect() { # WHAT WANT GOT
	if [[ "$3" != "$2" ]]; then
		say "$1: got $(printf %q "$3"), want $(printf %q "$2")"
		exit 1
	fi
}

# --- put, get and watch through both gateways -------------------------------------------
ctl --endpoints="$g2" watch --prefix smoke/ >"$logs/watch" 2>"$logs/watch.err" &
watch_pid=$!
sleep 1
ctl --endpoints="$g1" put smoke/a 1 >/dev/null
ctl --endpoints="$g2" put smoke/b 2 >/dev/null
expect "get through the second gateway" "$(printf 'smoke/a\n1')" "$(ctl --endpoints="$g2" get smoke/a)"
expect "get through the first gateway" "$(printf 'smoke/b\n2')" "$(ctl --endpoints="$g1" get smoke/b)"
say "put and get through both gateways: ok"

# --- kill the leader's replica container: writes go on ----------------------------------
leader=$(ctl --endpoints="$g1" endpoint status -w json | sed -n 's/.*"leader":\([0-9]*\).*/\1/p')
leader_name=$(ctl --endpoints="$g1" member list -w json | python3 -c '
import json, sys
lead = int(sys.argv[1])
print([m["name"] for m in json.load(sys.stdin)["members"] if m["ID"] == lead][0])' "$leader")
say "killing $leader_name, the leader"
docker kill "$(compose ps -q "$leader_name")" >/dev/null
# A put in flight to the killed leader may time out (as in etcd: it may or may not have
# been committed); the next ones must succeed.
deadline=$((SECONDS + 30))
until ctl --endpoints="$g1" put smoke/after-kill 0 >/dev/null 2>&1; do
	((SECONDS < deadline)) || {
		say "no write succeeded within 30s of the kill"
		exit 1
	}
done
for i in $(seq 1 10); do
	ctl --endpoints="$g1" put "smoke/c$i" "$i" >/dev/null
	ctl --endpoints="$g2" put "smoke/d$i" "$i" >/dev/null
done
expect "keys under smoke/" 23 "$(ctl --endpoints="$g2" get smoke/ --prefix --keys-only -w json | sed -n 's/.*"count":\([0-9]*\).*/\1/p')"
say "writes go on after the leader's kill: ok"

# The watch on the second gateway saw every put, in order, across the leader change (a
# put retried after a timeout may show twice in a row: uniq).
want_keys=$(printf 'smoke/a\nsmoke/b\nsmoke/after-kill\n'; for i in $(seq 1 10); do printf 'smoke/c%s\nsmoke/d%s\n' "$i" "$i"; done)
for _ in $(seq 20); do
	[[ $(grep -c '^PUT$' "$logs/watch") -ge 23 ]] && break
	sleep 0.5
done
expect "keys the watch saw" "$want_keys" "$(awk 'prev == "PUT" { print } { prev = $0 }' "$logs/watch" | uniq)"
say "watch through the second gateway saw all 23 puts: ok"

compose start "$leader_name" >/dev/null
wait_healthy "$leader_name"
say "$leader_name restarted and serves linearizable reads again: ok"

# --- a trace in Jaeger (when it runs) ---------------------------------------------------
if $with_jaeger; then
	ctl --endpoints="$g1" put smoke/traced 1 >/dev/null
	found=false
	for _ in $(seq 30); do
		if curl -fsS "http://127.0.0.1:$KVMESH_JAEGER_UI_PORT/api/traces?service=kvmesh-gateway&operation=etcdserverpb.KV/Put&limit=20" |
			python3 -c '
import json, sys
for t in json.load(sys.stdin)["data"]:
    names = {s["operationName"] for s in t["spans"]}
    if {"etcdserverpb.KV/Put", "kvmesh.replica.v1.KVService/Put", "raft.propose", "raft.commit", "mvcc.apply"} <= names:
        sys.exit(0)
sys.exit(1)'; then
			found=true
			break
		fi
		sleep 1
	done
	$found || {
		say "no trace gateway → replica → raft → apply in Jaeger"
		exit 1
	}
	say "a put is one trace in Jaeger, from the gateway to the apply: ok"
fi

# --- more gateways: --scale ------------------------------------------------------------
compose up -d --no-build --scale gateway-pool=2 gateway-pool
wait_healthy gateway-pool
g3=$(compose port --index=2 gateway-pool 2379)
g3=127.0.0.1:${g3##*:}
expect "get through a gateway added by --scale" "$(printf 'smoke/d10\n10')" "$(ctl --endpoints="$g3" get smoke/d10)"
say "a third gateway from --scale gateway-pool=2 ($g3) serves the same data: ok"

# --- down and up: the data stays -----------------------------------------------------------
kill "$watch_pid" 2>/dev/null || true
compose down >/dev/null 2>&1
compose up -d --no-build "${services[@]}"
wait_healthy "${checked[@]}"
expect "a key after down and up" "$(printf 'smoke/c10\n10')" "$(ctl --endpoints="$g1" get smoke/c10)"
say "the data survives compose down and up: ok"
say "PASSED"
