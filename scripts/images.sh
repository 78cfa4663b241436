#!/usr/bin/env bash
# Builds the mesh's container images without pulling anything from a registry: the
# binaries are compiled here (static, CGO off), and each image is the final stage of its
# deploy/<service>/Dockerfile (the part from "FROM scratch" on) around them. The tags
# are the ones docker-compose.yml names, so `docker compose up` then runs these images
# instead of building them.
#
#   scripts/images.sh            kvmesh/{nats,replica,gateway,fanout,devca}:dev
#   scripts/images.sh --jaeger   also kvmesh/jaeger:2.13.0, Jaeger v2 built from its Go
#                                module (about 6 minutes on 2 cores; the UI is Jaeger's
#                                placeholder page, as the UI's assets are not in the
#                                module: its HTTP API and OTLP ingest are complete). Use
#                                it with KVMESH_JAEGER_IMAGE=kvmesh/jaeger:2.13.0.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

jaeger=false
for arg in "$@"; do
	case $arg in
	--jaeger) jaeger=true ;;
	*)
		echo "usage: scripts/images.sh [--jaeger]" >&2
		exit 2
		;;
	esac
done

# The Jaeger release whose image docker-compose.yml names (v2.13.0 is the Go module's
# v1.76.0: Jaeger tags both on one commit).
jaeger_module=github.com/jaegertracing/jaeger@v1.76.0
jaeger_tag=kvmesh/jaeger:2.13.0

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "images: compiling static binaries" >&2
export CGO_ENABLED=0
go build -trimpath -ldflags='-s -w' -o "$work/bin/" \
	./services/replica/cmd/kvmesh-replica \
	./services/gateway/cmd/kvmesh-gateway \
	./services/fanout/cmd/kvmesh-fanout \
	./libs/cmd/kvmesh-probe \
	./libs/cmd/kvmesh-devca \
	github.com/nats-io/nats-server/v2

# build TAG DIR: the classic builder, which every Docker engine has (BuildKit needs the
# buildx plugin with some clients); its deprecation notice is shown only on failure.
build() {
	local out
	if ! out=$(DOCKER_BUILDKIT=0 docker build -q -t "$1" "$2" 2>&1); then
		echo "$out" >&2
		exit 1
	fi
}

# image SERVICE BINARY... [-- EXTRA_FILE...]: stage the files as the Dockerfile's build
# stage leaves them in /out and build its final stage.
image() {
	local svc=$1
	shift
	local ctx="$work/ctx-$svc"
	mkdir -p "$ctx/out/bin" "$ctx/out/data"
	for f in "$@"; do
		cp "$f" "$ctx/out/bin/"
	done
	sed -n '/^FROM scratch/,$p' "deploy/$svc/Dockerfile" | sed 's/--from=build //' >"$ctx/Dockerfile"
	echo "images: kvmesh/$svc:dev" >&2
	build "kvmesh/$svc:dev" "$ctx"
}

image nats "$work/bin/nats-server" "$work/bin/kvmesh-probe" deploy/nats/nats.conf
image replica "$work/bin/kvmesh-replica" "$work/bin/kvmesh-probe"
image gateway "$work/bin/kvmesh-gateway" "$work/bin/kvmesh-probe"
image fanout "$work/bin/kvmesh-fanout" "$work/bin/kvmesh-probe"
image devca "$work/bin/kvmesh-devca"

if $jaeger; then
	echo "images: building Jaeger from $jaeger_module (takes minutes)" >&2
	dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$jaeger_module" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	# Jaeger's go.mod has replace directives, so `go install` refuses it: build it as
	# the main module, from a writable copy of the module's source.
	cp -r "$dir" "$work/jaeger-src"
	chmod -R u+w "$work/jaeger-src"
	mkdir -p "$work/ctx-jaeger"
	(cd "$work/jaeger-src" && GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' -o "$work/ctx-jaeger/jaeger" ./cmd/jaeger)
	printf 'FROM scratch\nCOPY jaeger /jaeger\nENV JAEGER_LISTEN_HOST=0.0.0.0\nEXPOSE 4317 4318 16686 13133\nENTRYPOINT ["/jaeger"]\n' >"$work/ctx-jaeger/Dockerfile"
	echo "images: $jaeger_tag" >&2
	build "$jaeger_tag" "$work/ctx-jaeger"
fi
docker images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep '^kvmesh/' >&2
