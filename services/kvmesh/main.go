// Command kvmesh is the all-in-one kvmesh: one replica (a single-member Raft cluster
// over Pebble), a gateway serving etcd's API, the fanout and an embedded NATS server
// with JetStream, in one process. It is what a new user starts: `go run
// ./services/kvmesh` serves etcd clients on 127.0.0.1:2379.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/nats-io/nats.go"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/revstream"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/fanout"
	"github.com/kvmesh/kvmesh/services/gateway"
	"github.com/kvmesh/kvmesh/services/replica"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "snapshot" {
		if err := replica.SnapshotCommand(os.Args[2:], os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "kvmesh:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kvmesh:", err)
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
		gcfg gateway.Config
		fcfg fanout.Config
		ncfg revstream.Config
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
	if err := config.Load(ctx, "KVMESH_FANOUT_", &fcfg); err != nil {
		return err
	}
	if err := config.Load(ctx, "KVMESH_NATS_", &ncfg); err != nil {
		return err
	}
	if _, set := os.LookupEnv("KVMESH_FANOUT_LISTEN"); !set {
		fcfg.Listen = "" // the gateway's /metrics covers the whole process
	}
	// Check everything before starting anything.
	if err := errors.Join(rcfg.Validate(), gcfg.Validate(), fcfg.Validate(), ncfg.Validate()); err != nil {
		return err
	}
	if _, set := os.LookupEnv("KVMESH_REPLICA_CLIENT_URLS"); !set {
		// Clients reach this member through its own gateway.
		scheme := "http://"
		if gcfg.TLSCertFile != "" {
			scheme = "https://"
		}
		rcfg.ClientURLs = []string{scheme + gcfg.Listen}
	}
	tel, err := telemetry.New(ctx, "kvmesh", tcfg, os.Stderr)
	if err != nil {
		return err
	}
	defer tel.Shutdown(context.Background())

	// The replica's mesh identity (KVMESH_REPLICA_MTLS_…) is the process's: its
	// internal port and NATS, the only links that leave the process.
	mesh, err := rcfg.MTLS.Load("KVMESH_REPLICA_")
	if err != nil {
		return err
	}
	rep, err := replica.New(rcfg, tel)
	if err != nil {
		return err
	}
	if err := rep.Listen(); err != nil {
		rep.Stop(context.Background())
		return err
	}
	// NATS: the embedded server (its store beside the replica's data) unless a URL
	// names another.
	var (
		embedded *revstream.Embedded
		nc       *nats.Conn
	)
	if ncfg.URL == "" {
		embedded, err = revstream.StartEmbedded(filepath.Join(rcfg.DataDir, "nats"), ncfg.EmbeddedListen, mesh.ServerConfig(), rcfg.MTLS.AllowPlaintext, tel.Log)
		if err == nil {
			nc, err = nats.Connect("", nats.InProcessServer(embedded), nats.Name("kvmesh"), nats.MaxReconnects(-1))
		}
	} else {
		nc, err = revstream.Connect(ncfg.URL, "kvmesh", mesh.ClientConfig())
	}
	if err != nil {
		rep.Stop(context.Background())
		return fmt.Errorf("nats: %w", err)
	}
	stopNATS := func() {
		nc.Close()
		if embedded != nil {
			embedded.Stop()
		}
	}
	// The gateway and the fanout call the replica's internal API in process: the
	// methods its grpc-go server serves, called directly (any other member, should one
	// be added, over the network).
	dial := rep.Dialer(replicaapi.Network{TLS: mesh.ClientConfig(), Options: tel.GRPCInternalClient()})
	gcfg.Replicas = []string{"http://" + rep.Addr()}
	fcfg.Replicas = gcfg.Replicas
	gw, err := gateway.New(gcfg, tel, dial)
	if err == nil {
		err = gw.EnableWatch(nc, ncfg)
	}
	if err == nil {
		err = gw.Listen()
	}
	var fo *fanout.Fanout
	if err == nil {
		fo, err = fanout.New(fcfg, ncfg, tel, dial, nc)
	}
	if err == nil {
		err = fo.Listen()
	}
	if err != nil {
		stopNATS()
		rep.Stop(context.Background())
		return err
	}
	foCtx, stopFanout := context.WithCancel(context.Background())
	foDone := make(chan struct{})
	stopAll := func(ctx context.Context) error {
		stopFanout()
		<-foDone
		err := errors.Join(gw.Stop(ctx), rep.Stop(ctx))
		stopNATS()
		return err
	}
	runFanout := func() error {
		defer close(foDone)
		return fo.Run(foCtx)
	}
	return lifecycle.Serve(ctx, tel.Log, stopAll, rep.Serve, gw.Serve, runFanout)
}
