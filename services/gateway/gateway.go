// Package gateway is kvmesh's stateless front door: it serves etcd's public v3 API
// with connect-go (gRPC over h2c, gRPC-Web, Connect binary and JSON on one port) and
// forwards each request to a replica over kvmesh's internal Connect API.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"

	"connectrpc.com/connect"

	"github.com/kvmesh/kvmesh/libs/gen/etcdserverpb/etcdserverpbconnect"
	"github.com/kvmesh/kvmesh/libs/gen/kvmesh/replica/v1/replicav1connect"
	"github.com/kvmesh/kvmesh/libs/gen/v3electionpb/v3electionpbconnect"
	"github.com/kvmesh/kvmesh/libs/gen/v3lockpb/v3lockpbconnect"
	"github.com/kvmesh/kvmesh/libs/h2c"
	"github.com/kvmesh/kvmesh/libs/telemetry"
)

// Config is the gateway's configuration, from KVMESH_GATEWAY_… variables.
type Config struct {
	// Listen is the client address: etcd's API, /metrics and the health endpoints.
	Listen string `env:"LISTEN, default=127.0.0.1:2379"`
	// Replicas are the internal API URLs of the replicas.
	Replicas []string `env:"REPLICAS, default=http://127.0.0.1:2390"`
	// MaxRequestBytes is the largest request accepted (etcd's --max-request-bytes);
	// gRPC framing may add etcd's 512 KiB on top.
	MaxRequestBytes int `env:"MAX_REQUEST_BYTES, default=1572864"`
}

func (c *Config) validate() error {
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("KVMESH_GATEWAY_LISTEN: %w", err)
	}
	if len(c.Replicas) == 0 {
		return errors.New("KVMESH_GATEWAY_REPLICAS: at least one replica URL is needed")
	}
	for _, u := range c.Replicas {
		p, err := url.Parse(u)
		if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
			return fmt.Errorf("KVMESH_GATEWAY_REPLICAS: %q is not an http(s) URL", u)
		}
	}
	if c.MaxRequestBytes <= 0 {
		return errors.New("KVMESH_GATEWAY_MAX_REQUEST_BYTES: must be positive")
	}
	return nil
}

const healthCheckPath = "/grpc.health.v1.Health/Check"

// grpcOverheadBytes is the slack etcd allows above --max-request-bytes for framing.
const grpcOverheadBytes = 512 * 1024

// Gateway serves the public API.
type Gateway struct {
	cfg Config
	tel *telemetry.Telemetry
	log *slog.Logger

	kv      replicav1connect.KVServiceClient
	cluster replicav1connect.ClusterServiceClient
	maint   replicav1connect.MaintenanceServiceClient

	lis    net.Listener
	server *http.Server
}

// New builds a gateway; call Listen, then Serve.
func New(cfg Config, tel *telemetry.Telemetry) (*Gateway, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	g := &Gateway{cfg: cfg, tel: tel, log: tel.Log.With("role", "gateway")}
	client := h2c.NewClient()
	base := strings.TrimRight(cfg.Replicas[0], "/")
	opts := []connect.ClientOption{tel.Interceptor(true), connect.WithGRPC()}
	g.kv = replicav1connect.NewKVServiceClient(client, base, opts...)
	g.cluster = replicav1connect.NewClusterServiceClient(client, base, opts...)
	g.maint = replicav1connect.NewMaintenanceServiceClient(client, base, opts...)
	return g, nil
}

// Handler is the gateway's whole HTTP surface.
func (g *Gateway) Handler() http.Handler {
	mux := http.NewServeMux()
	opts := []connect.HandlerOption{
		g.tel.Interceptor(false),
		connect.WithReadMaxBytes(g.cfg.MaxRequestBytes + grpcOverheadBytes),
	}
	mux.Handle(etcdserverpbconnect.NewKVHandler(&kvHandler{g}, opts...))
	mux.Handle(etcdserverpbconnect.NewClusterHandler(&clusterHandler{g: g}, opts...))
	mux.Handle(etcdserverpbconnect.NewMaintenanceHandler(&maintenanceHandler{g: g}, opts...))
	// Not built yet: these answer Unimplemented, as the generated defaults do.
	mux.Handle(etcdserverpbconnect.NewWatchHandler(etcdserverpbconnect.UnimplementedWatchHandler{}, opts...))
	mux.Handle(etcdserverpbconnect.NewLeaseHandler(etcdserverpbconnect.UnimplementedLeaseHandler{}, opts...))
	mux.Handle(etcdserverpbconnect.NewAuthHandler(etcdserverpbconnect.UnimplementedAuthHandler{}, opts...))
	mux.Handle(v3lockpbconnect.NewLockHandler(v3lockpbconnect.UnimplementedLockHandler{}, opts...))
	mux.Handle(v3electionpbconnect.NewElectionHandler(v3electionpbconnect.UnimplementedElectionHandler{}, opts...))
	mux.Handle(healthCheckPath, connect.NewUnaryHandler(healthCheckPath, g.healthCheck, opts...))
	mux.Handle("/metrics", g.tel.MetricsHandler())
	mux.HandleFunc("/health", g.serveHealth)
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "ok") })
	mux.HandleFunc("/readyz", g.serveReady)
	return mux
}

// Listen binds the client address.
func (g *Gateway) Listen() error {
	lis, err := net.Listen("tcp", g.cfg.Listen)
	if err != nil {
		return fmt.Errorf("KVMESH_GATEWAY_LISTEN: %w", err)
	}
	g.lis = lis
	g.server = h2c.NewServer(g.Handler())
	return nil
}

// Addr is the bound client address.
func (g *Gateway) Addr() string { return g.lis.Addr().String() }

// Serve answers clients until Stop.
func (g *Gateway) Serve() error {
	g.log.Info("serving etcd API", "addr", g.Addr())
	if err := g.server.Serve(g.lis); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Stop stops accepting requests and waits for those in flight until ctx ends.
func (g *Gateway) Stop(ctx context.Context) error {
	if g.server == nil {
		return nil
	}
	if err := g.server.Shutdown(ctx); err != nil {
		return g.server.Close()
	}
	return nil
}
