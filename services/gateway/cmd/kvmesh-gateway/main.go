// Command kvmesh-gateway runs one stateless gateway: etcd's API on
// KVMESH_GATEWAY_LISTEN, forwarded to the replicas in KVMESH_GATEWAY_REPLICAS.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/revstream"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/gateway"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kvmesh-gateway:", err)
		os.Exit(1)
	}
}

func run() error {
	lifecycle.TuneGC()
	ctx, stop := lifecycle.SignalContext()
	defer stop()
	var (
		tcfg telemetry.Config
		gcfg gateway.Config
		ncfg revstream.Config
	)
	if err := config.Load(ctx, "KVMESH_", &tcfg); err != nil {
		return err
	}
	if err := config.Load(ctx, "KVMESH_GATEWAY_", &gcfg); err != nil {
		return err
	}
	if err := config.Load(ctx, "KVMESH_NATS_", &ncfg); err != nil {
		return err
	}
	if err := gcfg.Validate(); err != nil {
		return err
	}
	tel, err := telemetry.New(ctx, "kvmesh-gateway", tcfg, os.Stderr)
	if err != nil {
		return err
	}
	defer tel.Shutdown(context.Background())
	mesh, err := gcfg.MTLS.Load("KVMESH_GATEWAY_")
	if err != nil {
		return err
	}
	gw, err := gateway.New(gcfg, tel, nil)
	if err != nil {
		return err
	}
	if ncfg.URL == "" {
		tel.Log.Warn("KVMESH_NATS_URL is not set: Watch answers Unimplemented")
	} else {
		nc, err := revstream.Connect(ncfg.URL, "kvmesh-gateway", mesh.ClientConfig())
		if err != nil {
			return fmt.Errorf("KVMESH_NATS_URL: %w", err)
		}
		defer nc.Close()
		if err := gw.EnableWatch(nc, ncfg); err != nil {
			return err
		}
	}
	if err := gw.Listen(); err != nil {
		return err
	}
	return lifecycle.Serve(ctx, tel.Log, gw.Stop, gw.Serve)
}
