// Command kvmesh-fanout tails the replicas in KVMESH_FANOUT_REPLICAS and publishes
// every committed revision to the JetStream stream at KVMESH_NATS_URL.
package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/revstream"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/fanout"
)

func main() { lifecycle.Main("kvmesh-fanout", run) }

func run(ctx context.Context, tel *telemetry.Telemetry) error {
	var (
		fcfg fanout.Config
		ncfg revstream.Config
	)
	if err := config.LoadAll(ctx, config.Part{Prefix: "KVMESH_FANOUT_", Into: &fcfg, Validate: fcfg.Validate},
		config.Part{Prefix: "KVMESH_NATS_", Into: &ncfg, Validate: ncfg.Validate}); err != nil {
		return err
	}
	if ncfg.URL == "" {
		return errors.New("KVMESH_NATS_URL: the fanout needs a NATS server")
	}
	mesh, err := fcfg.MTLS.Load("KVMESH_FANOUT_")
	if err != nil {
		return err
	}
	nc, err := revstream.Connect(ncfg.URL, "kvmesh-fanout", mesh.ClientConfig())
	if err != nil {
		return fmt.Errorf("KVMESH_NATS_URL: %w", err)
	}
	defer nc.Close()
	f, err := fanout.New(fcfg, ncfg, tel, nil, nc)
	if err != nil {
		return err
	}
	if err := f.Listen(); err != nil {
		return err
	}
	return lifecycle.Run(ctx, tel.Log, f)
}
