// Command kvmesh is the all-in-one kvmesh: one replica (a single-member Raft cluster
// over Pebble), a gateway serving etcd's API, the fanout and an embedded NATS server
// with JetStream, in one process. It is what a new user starts: `go run
// ./services/kvmesh` serves etcd clients on 127.0.0.1:2379. `kvmesh snapshot
// status|restore` reads and restores snapshot files.
package main

import (
	"context"
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
		lifecycle.Exit("kvmesh", replica.SnapshotCommand(os.Args[2:], os.Stdout))
		return
	}
	lifecycle.Main("kvmesh", run)
}

func run(ctx context.Context, tel *telemetry.Telemetry) error {
	var (
		rcfg replica.Config
		gcfg gateway.Config
		fcfg fanout.Config
		ncfg revstream.Config
	)
	// Check everything before starting anything.
	if err := config.LoadAll(ctx,
		config.Part{Prefix: "KVMESH_REPLICA_", Into: &rcfg, Validate: rcfg.Validate},
		config.Part{Prefix: "KVMESH_GATEWAY_", Into: &gcfg, Validate: gcfg.Validate},
		config.Part{Prefix: "KVMESH_FANOUT_", Into: &fcfg, Validate: fcfg.Validate},
		config.Part{Prefix: "KVMESH_NATS_", Into: &ncfg, Validate: ncfg.Validate}); err != nil {
		return err
	}
	if _, set := os.LookupEnv("KVMESH_FANOUT_LISTEN"); !set {
		fcfg.Listen = "" // the gateway's /metrics covers the whole process
	}
	if _, set := os.LookupEnv("KVMESH_REPLICA_CLIENT_URLS"); !set {
		// Clients reach this member through its own gateway.
		scheme := "http://"
		if gcfg.TLSCertFile != "" {
			scheme = "https://"
		}
		rcfg.ClientURLs = []string{scheme + gcfg.Listen}
	}
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
		rep.Close()
		return err
	}
	// NATS: the embedded server (its store beside the replica's data) unless a URL
	// names another.
	var nc *nats.Conn
	if ncfg.URL == "" {
		embedded, err := revstream.StartEmbedded(filepath.Join(rcfg.DataDir, "nats"), ncfg.EmbeddedListen, mesh.ServerConfig(), rcfg.MTLS.AllowPlaintext, tel.Log)
		if err != nil {
			rep.Close()
			return fmt.Errorf("nats: %w", err)
		}
		defer embedded.Stop()
		nc, err = nats.Connect("", nats.InProcessServer(embedded), nats.Name("kvmesh"), nats.MaxReconnects(-1))
		if err != nil {
			rep.Close()
			return fmt.Errorf("nats: %w", err)
		}
	} else if nc, err = revstream.Connect(ncfg.URL, "kvmesh", mesh.ClientConfig()); err != nil {
		rep.Close()
		return fmt.Errorf("nats: %w", err)
	}
	defer nc.Close()

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
		rep.Close()
		return err
	}
	// The replica first: the gateway and the fanout call it from their start on.
	// Stopped in the reverse order.
	return lifecycle.Run(ctx, tel.Log, rep, gw, fo)
}
