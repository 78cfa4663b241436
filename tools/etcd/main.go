// Command etcd is upstream etcd's server, built from the Go module proxy at the version
// pinned in this directory's go.mod. kvmesh's benchmarks and differential tests run it
// side by side with kvmesh; it is never part of kvmesh itself.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
