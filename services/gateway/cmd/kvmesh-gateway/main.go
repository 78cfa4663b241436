// Command kvmesh-gateway runs one stateless gateway: etcd's API on
// KVMESH_GATEWAY_LISTEN, forwarded to the replicas in KVMESH_GATEWAY_REPLICAS.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/kvmesh/kvmesh/libs/config"
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
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var (
		tcfg telemetry.Config
		gcfg gateway.Config
	)
	if err := config.Load(ctx, "KVMESH_", &tcfg); err != nil {
		return err
	}
	if err := config.Load(ctx, "KVMESH_GATEWAY_", &gcfg); err != nil {
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
	gw, err := gateway.New(gcfg, tel, nil)
	if err != nil {
		return err
	}
	if err := gw.Listen(); err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- gw.Serve() }()
	select {
	case <-ctx.Done():
		tel.Log.Info("shutting down")
	case err = <-errc:
		tel.Log.Error("server failed", "err", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return errors.Join(err, gw.Stop(sctx))
}
