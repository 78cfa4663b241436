// Command kvmesh is the all-in-one kvmesh: one replica (a single-member Raft cluster
// over Pebble) and a gateway serving etcd's API, in one process; the gateway serves
// watches from the replica's feed. With KVMESH_NATS_URL or KVMESH_NATS_EMBEDDED_LISTEN
// (for other gateways to share the revision stream) it runs the fanout too, and an
// embedded NATS server with JetStream unless the URL names another. It is what a new
// user starts: `go run ./services/kvmesh` serves etcd clients on 127.0.0.1:2379.
// `kvmesh snapshot status|restore` reads and restores snapshot files.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/nats-io/nats.go"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/meshtls"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/revstream"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/fanout"
	"github.com/kvmesh/kvmesh/services/gateway"
	"github.com/kvmesh/kvmesh/services/gateway/watch"
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
	// The gateway (and the fanout) call the replica's internal API in process: the
	// methods its grpc-go server serves, called directly (any other member, should one
	// be added, over the network).
	dial := rep.Dialer(replicaapi.Network{TLS: mesh.ClientConfig(), Options: tel.GRPCInternalClient()})
	gcfg.Replicas = []string{"http://" + rep.Addr()}
	fcfg.Replicas = gcfg.Replicas
	gw, err := gateway.New(gcfg, tel, dial)
	if err != nil {
		rep.Close()
		return err
	}
	roles := []lifecycle.Role{rep, gw}
	if ncfg.URL == "" && ncfg.EmbeddedListen == "" {
		// The only gateway is this one: it follows the replica's feed itself. A
		// revision stream would be written to JetStream's disk and read back by the
		// same process, for no other reader (BENCHMARKS.md: a fifth of the CPU of a
		// put).
		err = gw.EnableWatch(watch.ReplicaFeed())
	} else {
		// Other gateways share the revision stream: the fanout publishes it to NATS,
		// the embedded server (its store beside the replica's data) unless a URL names
		// another.
		var fo *fanout.Fanout
		var stop func()
		fo, stop, err = startStream(rcfg, fcfg, ncfg, mesh, tel, dial, gw)
		if stop != nil {
			defer stop()
		}
		roles = append(roles, fo)
	}
	if err == nil {
		err = gw.Listen()
	}
	if err != nil {
		rep.Close()
		return err
	}
	// The replica first: the gateway and the fanout call it from their start on.
	// Stopped in the reverse order.
	return lifecycle.Run(ctx, tel.Log, roles...)
}

// startStream connects to NATS (starting the embedded server when ncfg names none),
// makes gw's hub consume the revision stream, and builds the fanout that publishes it
// (the fanout's Listen done). stop, when not nil, closes what it started.
func startStream(rcfg replica.Config, fcfg fanout.Config, ncfg revstream.Config, mesh *meshtls.Mesh, tel *telemetry.Telemetry,
	dial replicaapi.Dialer, gw *gateway.Gateway) (fo *fanout.Fanout, stop func(), err error) {
	var nc *nats.Conn
	var closers []func()
	stop = func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	if ncfg.URL == "" {
		embedded, err := revstream.StartEmbedded(filepath.Join(rcfg.DataDir, "nats"), ncfg.EmbeddedListen, mesh.ServerConfig(), rcfg.MTLS.AllowPlaintext, tel.Log)
		if err != nil {
			return nil, nil, fmt.Errorf("nats: %w", err)
		}
		closers = append(closers, embedded.Stop)
		if nc, err = nats.Connect("", nats.InProcessServer(embedded), nats.Name("kvmesh"), nats.MaxReconnects(-1)); err != nil {
			return nil, stop, fmt.Errorf("nats: %w", err)
		}
	} else if nc, err = revstream.Connect(ncfg.URL, "kvmesh", mesh.ClientConfig()); err != nil {
		return nil, nil, fmt.Errorf("nats: %w", err)
	}
	closers = append(closers, nc.Close)
	src, err := watch.JetStream(nc, ncfg)
	if err == nil {
		err = gw.EnableWatch(src)
	}
	if err == nil {
		fo, err = fanout.New(fcfg, ncfg, tel, dial, nc)
	}
	if err == nil {
		err = fo.Listen()
	}
	return fo, stop, err
}
