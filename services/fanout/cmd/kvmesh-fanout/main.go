// Command kvmesh-fanout tails the replicas in KVMESH_FANOUT_REPLICAS and publishes
// every committed revision to the JetStream stream at KVMESH_NATS_URL.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/revstream"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/fanout"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kvmesh-fanout:", err)
		os.Exit(1)
	}
}

func run() error {
	lifecycle.TuneGC()
	ctx, stop := lifecycle.SignalContext()
	defer stop()
	var (
		tcfg telemetry.Config
		fcfg fanout.Config
		ncfg revstream.Config
	)
	if err := config.Load(ctx, "KVMESH_", &tcfg); err != nil {
		return err
	}
	if err := config.Load(ctx, "KVMESH_FANOUT_", &fcfg); err != nil {
		return err
	}
	if err := config.Load(ctx, "KVMESH_NATS_", &ncfg); err != nil {
		return err
	}
	if err := errors.Join(fcfg.Validate(), ncfg.Validate()); err != nil {
		return err
	}
	if ncfg.URL == "" {
		return errors.New("KVMESH_NATS_URL: the fanout needs a NATS server")
	}
	tel, err := telemetry.New(ctx, "kvmesh-fanout", tcfg, os.Stderr)
	if err != nil {
		return err
	}
	defer tel.Shutdown(context.Background())
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
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	return lifecycle.Serve(ctx, tel.Log, func(context.Context) error {
		cancel()
		<-done
		return nil
	}, func() error {
		defer close(done)
		return f.Run(runCtx)
	})
}
