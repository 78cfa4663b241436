// Command kvmesh is the all-in-one kvmesh: one replica (a single-member Raft cluster
// over Pebble) and a gateway serving etcd's API, in one process. It is what a new user
// starts: `go run ./services/kvmesh` serves etcd clients on 127.0.0.1:2379.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime/debug"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/inproc"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/gateway"
	"github.com/kvmesh/kvmesh/services/replica"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kvmesh:", err)
		os.Exit(1)
	}
}

func run() error {
	if _, set := os.LookupEnv("GOGC"); !set {
		// Serving a request allocates briefly and keeps little: collecting half as
		// often saves a sixth of the CPU per request (BENCHMARKS.md). The live Go heap stays
		// small (Pebble keeps its block cache outside it), so the cost is bounded.
		debug.SetGCPercent(400)
	}
	ctx, stop := lifecycle.SignalContext()
	defer stop()

	var (
		tcfg telemetry.Config
		rcfg replica.Config
		gcfg gateway.Config
	)
	if err := config.Load(ctx, "KVMESH_", &tcfg); err != nil {
		return err
	}
	if err := config.Load(ctx, "KVMESH_REPLICA_", &rcfg); err != nil {
		return err
	}
	if err := config.Load(ctx, "KVMESH_GATEWAY_", &gcfg); err != nil {
		return err
	}
	// Check everything before starting anything.
	if err := errors.Join(rcfg.Validate(), gcfg.Validate()); err != nil {
		return err
	}
	if _, set := os.LookupEnv("KVMESH_REPLICA_CLIENT_URLS"); !set {
		// Clients reach this member through its own gateway.
		rcfg.ClientURLs = []string{"http://" + gcfg.Listen}
	}
	tel, err := telemetry.New(ctx, "kvmesh", tcfg, os.Stderr)
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
	// The gateway reaches its replica over the internal API, as it does in the mesh,
	// but in-process: the same Connect calls without sockets.
	gcfg.Replicas = []string{"http://" + rep.Addr()}
	gw, err := gateway.New(gcfg, tel, inproc.NewClient(rep.Handler()))
	if err == nil {
		err = gw.Listen()
	}
	if err != nil {
		rep.Stop(context.Background())
		return err
	}
	stopAll := func(ctx context.Context) error { return errors.Join(gw.Stop(ctx), rep.Stop(ctx)) }
	return lifecycle.Serve(ctx, tel.Log, stopAll, rep.Serve, gw.Serve)
}
