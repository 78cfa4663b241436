#!/usr/bin/env bash
# The one command that runs every kvmesh test on a fresh machine (README, .ci/run).
# It installs what the tests need (Debian's etcd-server and etcd-client; the pinned Go
# tools), checks that generated code and formatting are current, vets, and runs the
# tests of every module in go.work: unit, integration, and black-box end-to-end tests
# against the real binaries, with etcd itself as the oracle.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

need_apt=()
command -v etcd >/dev/null 2>&1 || [[ -x /usr/bin/etcd ]] || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
if ((${#need_apt[@]})); then
	echo "test: installing ${need_apt[*]} (Debian packages)" >&2
	sudo=""
	[[ $(id -u) -eq 0 ]] || sudo="sudo"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

scripts/generate.sh --check

unformatted=$(git ls-files '*.go' | grep -v '^api/gen/' | xargs gofmt -l)
if [[ -n "$unformatted" ]]; then
	echo "gofmt would change:" >&2
	echo "$unformatted" >&2
	exit 1
fi

# Clients pull in no server: the client module and the load generator link neither
# Pebble, nor a NATS server, nor porcupine.
if server=$(go list -deps ./api/... ./loadtest | grep -E 'cockroachdb/pebble|nats-io/nats-server|anishathalye/porcupine'); then
	echo "a client links server code:" >&2
	echo "$server" >&2
	exit 1
fi

mapfile -t modules < <(go list -m -f '{{.Path}}/...')
go vet "${modules[@]}"

# Every module's tests. The black-box suites compare kvmesh with Debian's etcd (3.4).
go test -count=1 -timeout 15m "$@" "${modules[@]}"

# The differential test once more, with the current etcd (3.7, pinned in tools/etcd)
# as the oracle.
KVMESH_E2E_ETCD_BIN="$root/.bin/etcd" go test -count=1 -timeout 5m -run 'TestDifferential' "$@" github.com/kvmesh/kvmesh/tests/e2e

# The end-to-end suites once more against a mesh: every kvmesh server the tests start is
# three replicas, NATS, the fanout and a gateway, each its own process
# (tests/harness/cmd/kvmesh-mesh). The TestMesh… tests build their meshes themselves.
KVMESH_E2E_TOPOLOGY=mesh go test -count=1 -timeout 10m -skip 'TestMesh|TestClientv3' "$@" github.com/kvmesh/kvmesh/tests/e2e

# The compose smoke test (scripts/smoke.sh): the images, the mesh of docker-compose.yml,
# etcdctl through both gateways, a replica killed. Skipped, saying so, where no Docker
# engine can be started.
scripts/smoke.sh --if-possible
