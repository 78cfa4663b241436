// Command kvmesh-replica runs one replica of a kvmesh cluster: a Raft member with its
// MVCC state in Pebble, serving the internal API (gateways) and the peer API (other
// replicas) on KVMESH_REPLICA_LISTEN. `kvmesh-replica snapshot status|restore` reads
// and restores snapshot files.
package main

import (
	"context"
	"os"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/replica"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "snapshot" {
		lifecycle.Exit("kvmesh-replica", replica.SnapshotCommand(os.Args[2:], os.Stdout))
		return
	}
	lifecycle.Main("kvmesh-replica", run)
}

func run(ctx context.Context, tel *telemetry.Telemetry) error {
	var rcfg replica.Config
	if err := config.LoadAll(ctx, config.Part{Prefix: "KVMESH_REPLICA_", Into: &rcfg, Validate: rcfg.Validate}); err != nil {
		return err
	}
	rep, err := replica.New(rcfg, tel)
	if err != nil {
		return err
	}
	if err := rep.Listen(); err != nil {
		rep.Close()
		return err
	}
	// A member removed from the cluster stops, as etcd's does.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-rep.Removed():
			cancel()
		case <-ctx.Done():
		}
	}()
	return lifecycle.Run(ctx, tel.Log, rep)
}
