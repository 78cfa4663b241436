#!/usr/bin/env bash
# Builds the pinned developer tools into .bin/: buf and the protoc plugins (versions in
# tools/go.mod) and upstream etcd (version in tools/etcd/go.mod) for the differential
# tests and benchmarks, its etcdctl (tools/etcdctl) and etcd's own benchmark tool
# (tools/etcd-benchmark). Rebuilds only when the pins change.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.bin"
mkdir -p "$bin"
export GOWORK=off

build() { # build STAMPFILE GOMOD_DIR PKGS...
	local stamp="$bin/.$1" dir="$2"
	shift 2
	local want
	want=$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -d' ' -f1)
	if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
		return
	fi
	echo "tools: building $* (pinned in ${dir#$root/}/go.mod)" >&2
	(cd "$dir" && go build -o "$bin/" "$@")
	echo "$want" >"$stamp"
}

build codegen "$root/tools" github.com/bufbuild/buf/cmd/buf google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc connectrpc.com/connect/cmd/protoc-gen-connect-go
build etcd "$root/tools/etcd" .
build etcd-benchmark "$root/tools/etcd-benchmark" .
build etcdctl "$root/tools/etcdctl" .
