// Command benchmark is upstream etcd's own benchmark tool (tools/benchmark), built
// from the Go module proxy at the version pinned in this directory's go.mod, so that
// kvmesh is measured side by side with etcd by etcd's ruler as well as by loadtest.
// It is never part of kvmesh itself.
package main

import (
	"fmt"
	"os"

	"go.etcd.io/etcd/v3/tools/benchmark/cmd"
)

func main() {
	if err := cmd.RootCmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
