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
	"net/http/pprof"
	"net/url"

	"connectrpc.com/connect"
	"google.golang.org/grpc"

	"github.com/kvmesh/kvmesh/libs/gen/etcdserverpb/etcdserverpbconnect"
	"github.com/kvmesh/kvmesh/libs/gen/v3electionpb/v3electionpbconnect"
	"github.com/kvmesh/kvmesh/libs/gen/v3lockpb/v3lockpbconnect"
	"github.com/kvmesh/kvmesh/libs/h2c"
	"github.com/kvmesh/kvmesh/libs/inproc"
	"github.com/kvmesh/kvmesh/libs/rpcmux"
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
	// EnablePprof serves Go's profiler on /debug/pprof/ (etcd's --enable-pprof).
	EnablePprof bool `env:"ENABLE_PPROF, default=false"`
}

// Validate checks the configuration; errors name the variable.
func (c *Config) Validate() error {
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

// grpcOverheadBytes is the slack etcd allows above --max-request-bytes for framing.
const grpcOverheadBytes = 512 * 1024

// Gateway serves the public API.
type Gateway struct {
	cfg Config
	tel *telemetry.Telemetry
	log *slog.Logger

	// inProcess is set when the replica is reached in-process (the all-in-one).
	inProcess bool

	// client carries internal API calls; view knows the replicas and the leader.
	client   connect.HTTPClient
	view     *view
	stopView context.CancelFunc

	lis    net.Listener
	split  *splitListener
	server *http.Server
	grpc   *grpc.Server
}

// New builds a gateway; call Listen, then Serve. client carries the internal API calls
// to the replicas; nil means h2c over the network.
func New(cfg Config, tel *telemetry.Telemetry, client connect.HTTPClient) (*Gateway, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	g := &Gateway{cfg: cfg, tel: tel, log: tel.Log.With("role", "gateway")}
	if client == nil {
		client = h2c.NewClient()
	}
	_, g.inProcess = client.(*inproc.Client)
	g.client = client
	g.view = newView(g, cfg.Replicas)
	ctx, cancel := context.WithCancel(context.Background())
	g.stopView = cancel
	go g.view.run(ctx)
	return g, nil
}

// Handler is the gateway's whole HTTP surface.
func (g *Gateway) Handler() http.Handler {
	mux := rpcmux.New()
	opts := append(g.tel.PublicHandler(), connect.WithReadMaxBytes(g.cfg.MaxRequestBytes+grpcOverheadBytes))
	mux.Handle(etcdserverpbconnect.NewKVHandler(connectKV{g: g}, opts...))
	mux.Handle(etcdserverpbconnect.NewClusterHandler(connectCluster{g: g}, opts...))
	mux.Handle(etcdserverpbconnect.NewMaintenanceHandler(connectMaintenance{g: g}, opts...))
	// Not built yet: these answer Unimplemented, as the generated defaults do.
	mux.Handle(etcdserverpbconnect.NewWatchHandler(etcdserverpbconnect.UnimplementedWatchHandler{}, opts...))
	mux.Handle(etcdserverpbconnect.NewLeaseHandler(etcdserverpbconnect.UnimplementedLeaseHandler{}, opts...))
	mux.Handle(etcdserverpbconnect.NewAuthHandler(etcdserverpbconnect.UnimplementedAuthHandler{}, opts...))
	mux.Handle(v3lockpbconnect.NewLockHandler(v3lockpbconnect.UnimplementedLockHandler{}, opts...))
	mux.Handle(v3electionpbconnect.NewElectionHandler(v3electionpbconnect.UnimplementedElectionHandler{}, opts...))
	mux.Handle(healthCheckPath, connect.NewUnaryHandler(healthCheckPath, g.connectHealthCheck, opts...))
	mux.Handle("/metrics", g.tel.MetricsHandler())
	mux.HandleFunc("/health", g.serveHealth)
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "ok") })
	mux.HandleFunc("/readyz", g.serveReady)
	if g.cfg.EnablePprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// Listen binds the client address. gRPC connections go to grpc-go, the rest to
// net/http with the Connect handlers (see sniff.go).
func (g *Gateway) Listen() error {
	lis, err := net.Listen("tcp", g.cfg.Listen)
	if err != nil {
		return fmt.Errorf("KVMESH_GATEWAY_LISTEN: %w", err)
	}
	g.lis = lis
	g.server = h2c.NewServer(g.Handler())
	g.grpc = g.newGRPCServer()
	return nil
}

// Addr is the bound client address.
func (g *Gateway) Addr() string { return g.lis.Addr().String() }

// Serve answers clients until Stop.
func (g *Gateway) Serve() error {
	g.log.Info("serving etcd API", "addr", g.Addr())
	g.split = newSplitListener(g.lis, g.log)
	errc := make(chan error, 2)
	go func() { errc <- g.grpc.Serve(g.split.grpcL) }()
	go func() { errc <- g.server.Serve(g.split.httpL) }()
	err := <-errc
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, grpc.ErrServerStopped) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Stop stops accepting requests and waits for those in flight until ctx ends.
func (g *Gateway) Stop(ctx context.Context) error {
	g.stopView()
	if g.server == nil {
		return nil
	}
	g.lis.Close()
	stopped := make(chan struct{})
	go func() {
		g.grpc.GracefulStop()
		close(stopped)
	}()
	err := g.server.Shutdown(ctx)
	select {
	case <-stopped:
	case <-ctx.Done():
		g.grpc.Stop()
	}
	if err != nil {
		return g.server.Close()
	}
	return nil
}
