// Command kvmesh-replica runs one replica of a kvmesh cluster: a Raft member with its
// MVCC state in Pebble, serving the internal API (gateways) and the peer API (other
// replicas) on KVMESH_REPLICA_LISTEN.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/replica"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "snapshot" {
		if err := replica.SnapshotCommand(os.Args[2:], os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "kvmesh-replica:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kvmesh-replica:", err)
		os.Exit(1)
	}
}

func run() error {
	lifecycle.TuneGC()
	ctx, stop := lifecycle.SignalContext()
	defer stop()
	var (
		tcfg telemetry.Config
		rcfg replica.Config
	)
	if err := config.Load(ctx, "KVMESH_", &tcfg); err != nil {
		return err
	}
	if err := config.Load(ctx, "KVMESH_REPLICA_", &rcfg); err != nil {
		return err
	}
	if err := rcfg.Validate(); err != nil {
		return err
	}
	tel, err := telemetry.New(ctx, "kvmesh-replica", tcfg, os.Stderr)
	if err != nil {
		return err
	}
	defer tel.Shutdown(context.Background())
	rep, err := replica.New(rcfg, tel)
	if err != nil {
		return err
	}
	if err := rep.Listen(); err != nil {
		rep.Stop(context.Background())
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
	return lifecycle.Serve(ctx, tel.Log, rep.Stop, rep.Serve)
}
