// Command kvmesh-gateway serves etcd's client API (gRPC, gRPC-Web, Connect) on
// KVMESH_GATEWAY_LISTEN, forwarding to the replicas in KVMESH_GATEWAY_REPLICAS and
// serving watches from the revision stream at KVMESH_NATS_URL.
package main

import (
	"context"
	"fmt"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/revstream"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/gateway"
	"github.com/kvmesh/kvmesh/services/gateway/watch"
)

func main() { lifecycle.Main("kvmesh-gateway", run) }

func run(ctx context.Context, tel *telemetry.Telemetry) error {
	var (
		gcfg gateway.Config
		ncfg revstream.Config
	)
	if err := config.LoadAll(ctx, config.Part{Prefix: "KVMESH_GATEWAY_", Into: &gcfg, Validate: gcfg.Validate},
		config.Part{Prefix: "KVMESH_NATS_", Into: &ncfg}); err != nil {
		return err
	}
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
		src, err := watch.JetStream(nc, ncfg)
		if err == nil {
			err = gw.EnableWatch(src)
		}
		if err != nil {
			return err
		}
	}
	if err := gw.Listen(); err != nil {
		return err
	}
	return lifecycle.Run(ctx, tel.Log, gw)
}
