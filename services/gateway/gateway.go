// Package gateway is kvmesh's stateless front door: it serves etcd's public v3 API
// with connect-go (gRPC over h2c, gRPC-Web, Connect binary and JSON on one port) and
// forwards each request to a replica over kvmesh's internal Connect API.
package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/grpcsplit"
	"github.com/kvmesh/kvmesh/libs/h2c"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/meshtls"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/rpcmux"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/gateway/watch"
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
	// WatchProgressNotifyInterval is how often watchers that asked for progress_notify
	// get one (etcd's --experimental-watch-progress-notify-interval).
	WatchProgressNotifyInterval time.Duration `env:"WATCH_PROGRESS_NOTIFY_INTERVAL, default=10m"`
	// WatchRingRevisions is how many recent revisions the gateway keeps in memory for
	// watchers that start slightly in the past or fell behind.
	WatchRingRevisions int `env:"WATCH_RING_REVISIONS, default=20000"`
	// WatchRingBytes bounds the memory of those revisions.
	WatchRingBytes int `env:"WATCH_RING_BYTES, default=67108864"`
	// WatchStreamQueue is how many revisions wait for one slow client stream before it
	// is caught up from history instead.
	WatchStreamQueue int `env:"WATCH_STREAM_QUEUE, default=1024"`
	// WatchIdleAfter is how long a gateway of the mesh goes on following the revision
	// stream once no watch stream is open; then it stops until one opens, and costs
	// nothing per revision (0: always follow). The all-in-one always follows.
	WatchIdleAfter time.Duration `env:"WATCH_IDLE_AFTER, default=30s"`

	// Namespace prefixes every key of every request (etcd's grpc-proxy --namespace):
	// clients of this gateway see only the keys under it, without the prefix. A user's
	// tenant namespace (kvmesh.tenant.v1) goes after it.
	Namespace string `env:"NAMESPACE"`

	// TLSCertFile and TLSKeyFile are the certificate clients see (etcd's --cert-file and
	// --key-file); set, the client port speaks TLS only.
	TLSCertFile string `env:"TLS_CERT_FILE"`
	TLSKeyFile  string `env:"TLS_KEY_FILE"`
	// TLSTrustedCAFile is the CA that signs client certificates (etcd's
	// --trusted-ca-file).
	TLSTrustedCAFile string `env:"TLS_TRUSTED_CA_FILE"`
	// ClientCertAuth requires every client to present a certificate the trusted CA
	// signed; with auth enabled, a request without a token runs as the user the
	// certificate's common name names (etcd's --client-cert-auth).
	ClientCertAuth bool `env:"CLIENT_CERT_AUTH, default=false"`

	// MTLS is the gateway's identity in the mesh (KVMESH_GATEWAY_MTLS_CERT_FILE, _KEY_FILE,
	// _CA_FILE), for its calls to the replicas (https:// URLs) and to NATS.
	// KVMESH_GATEWAY_ALLOW_PLAINTEXT=true lets the client port be plaintext off loopback.
	MTLS meshtls.Config
}

// Validate checks the configuration; errors name the variable.
func (c *Config) Validate() error {
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("KVMESH_GATEWAY_LISTEN: %w", err)
	}
	if c.MaxRequestBytes <= 0 {
		return errors.New("KVMESH_GATEWAY_MAX_REQUEST_BYTES: must be positive")
	}
	if c.WatchProgressNotifyInterval < 0 {
		return errors.New("KVMESH_GATEWAY_WATCH_PROGRESS_NOTIFY_INTERVAL: must not be negative")
	}
	if c.WatchRingRevisions < 16 {
		return errors.New("KVMESH_GATEWAY_WATCH_RING_REVISIONS: must be at least 16")
	}
	if c.WatchRingBytes < 1<<20 {
		return errors.New("KVMESH_GATEWAY_WATCH_RING_BYTES: must be at least 1 MiB")
	}
	if c.WatchIdleAfter < 0 {
		return errors.New("KVMESH_GATEWAY_WATCH_IDLE_AFTER: must not be negative")
	}
	if c.WatchStreamQueue < 1 {
		return errors.New("KVMESH_GATEWAY_WATCH_STREAM_QUEUE: must be positive")
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return errors.New("KVMESH_GATEWAY_TLS_CERT_FILE and KVMESH_GATEWAY_TLS_KEY_FILE: set both or neither")
	}
	if c.ClientCertAuth && (c.TLSCertFile == "" || c.TLSTrustedCAFile == "") {
		return errors.New("KVMESH_GATEWAY_CLIENT_CERT_AUTH: needs KVMESH_GATEWAY_TLS_CERT_FILE, _KEY_FILE and _TLS_TRUSTED_CA_FILE")
	}
	if c.TLSTrustedCAFile != "" && c.TLSCertFile == "" {
		return errors.New("KVMESH_GATEWAY_TLS_TRUSTED_CA_FILE: needs KVMESH_GATEWAY_TLS_CERT_FILE and _KEY_FILE")
	}
	if err := c.MTLS.Validate("KVMESH_GATEWAY_"); err != nil {
		return err
	}
	return config.CheckReplicaURLs("KVMESH_GATEWAY_REPLICAS", c.Replicas, c.MTLS.Enabled())
}

// grpcOverheadBytes is the slack etcd allows above --max-request-bytes for framing.
const grpcOverheadBytes = 512 * 1024

// Gateway serves the public API.
type Gateway struct {
	cfg    Config
	ready  chan struct{} // closed once Run serves
	tel    *telemetry.Telemetry
	log    *slog.Logger
	tracer trace.Tracer

	// seenRev is the highest revision of any answer this gateway passed on: a watch
	// created after it starts after it, so a client sees its own writes.
	seenRev atomic.Int64
	// hub serves watches; nil until EnableWatch.
	hub *watch.Hub

	// background is the context of the loops Serve starts (the view's and the auth
	// copy's refreshes, the hub); Stop ends it.
	background     context.Context
	stopBackground context.CancelFunc

	// view knows the replicas, the links to them and the leader.
	view   *view
	leases *leaseRouter
	auth   *authCache
	m      gatewayMetrics

	// mesh is the mutual TLS of calls to the replicas (nil: plaintext); clientTLS the
	// client port's TLS (nil: plaintext).
	mesh      *meshtls.Mesh
	clientTLS *tls.Config
	// namespace is cfg.Namespace (nil: none).
	namespace []byte

	lis    net.Listener
	server *http.Server
	grpc   *grpc.Server
}

// New builds a gateway and starts nothing; call Listen, then Serve. dial links the gateway to the
// replicas; nil means over the network (replicaapi.Network, with the mesh's TLS).
func New(cfg Config, tel *telemetry.Telemetry, dial replicaapi.Dialer) (*Gateway, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	g := &Gateway{cfg: cfg, tel: tel, log: tel.Log.With("role", "gateway"), tracer: tel.Tracer.Tracer("kvmesh/gateway")}
	if cfg.Namespace != "" {
		g.namespace = []byte(cfg.Namespace)
	}
	var err error
	if g.mesh, err = cfg.MTLS.Load("KVMESH_GATEWAY_"); err != nil {
		return nil, err
	}
	if cfg.TLSCertFile != "" {
		if g.clientTLS, err = meshtls.ClientFacing(cfg.TLSCertFile, cfg.TLSKeyFile, cfg.TLSTrustedCAFile, cfg.ClientCertAuth); err != nil {
			return nil, fmt.Errorf("KVMESH_GATEWAY_TLS_…: %w", err)
		}
	}
	if dial == nil {
		dial = replicaapi.Network{TLS: g.mesh.ClientConfig(), Options: tel.GRPCInternalClient()}
	}
	if g.view, err = newView(g, dial, cfg.Replicas); err != nil {
		return nil, err
	}
	g.leases = newLeaseRouter(g)
	g.auth = newAuthCache(g)
	g.registerMetrics()
	g.background, g.stopBackground = context.WithCancel(context.Background())
	g.ready = make(chan struct{})
	return g, nil
}

// EnableWatch serves etcd's Watch from src (package watch: the revision stream the
// fanout publishes to NATS, or the replica's feed in the all-in-one), from Serve on.
// Without it Watch answers Unimplemented.
func (g *Gateway) EnableWatch(src watch.Source) error {
	h, err := watch.New(watch.Config{
		RingRevisions:          g.cfg.WatchRingRevisions,
		RingBytes:              g.cfg.WatchRingBytes,
		StreamQueue:            g.cfg.WatchStreamQueue,
		ProgressNotifyInterval: g.cfg.WatchProgressNotifyInterval,
		FragmentBytes:          g.cfg.MaxRequestBytes + grpcOverheadBytes,
		IdleAfter:              g.cfg.WatchIdleAfter,
	}, src, watch.Deps{
		Replicas:   watchReplicas{view: g.view},
		Authorizer: watchAuthorizer{g},
		Cluster:    watchCluster{g},
	}, g.tel)
	if err != nil {
		return err
	}
	g.hub = h
	return nil
}

func (g *Gateway) sawRevision(rev int64) {
	for {
		cur := g.seenRev.Load()
		if rev <= cur || g.seenRev.CompareAndSwap(cur, rev) {
			return
		}
	}
}

func (g *Gateway) seen() int64 { return g.seenRev.Load() }

// Handler is the gateway's whole HTTP surface.
func (g *Gateway) Handler() http.Handler {
	mux := rpcmux.New()
	opts := append(g.tel.PublicHandler(), connect.WithReadMaxBytes(g.cfg.MaxRequestBytes+grpcOverheadBytes))
	g.connectRoutes(mux, opts)
	mux.Handle("/metrics", g.tel.MetricsHandler())
	g.healthEndpoints().Install(mux)
	if g.cfg.EnablePprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// Listen binds the client address. gRPC connections go to grpc-go, the rest to
// net/http with the Connect handlers (see libs/grpcsplit).
func (g *Gateway) Listen() error {
	lis, err := meshtls.Listen("KVMESH_GATEWAY_LISTEN", "KVMESH_GATEWAY_ALLOW_PLAINTEXT", g.cfg.Listen, g.clientTLS, g.cfg.MTLS.AllowPlaintext)
	if err != nil {
		return err
	}
	g.lis = lis
	g.server = h2c.NewServer(g.Handler())
	// Requests find their connection's TLS state (client-certificate auth).
	g.server.ConnContext = meshtls.WithConn
	g.grpc = g.newGRPCServer()
	return nil
}

// Addr is the bound client address.
func (g *Gateway) Addr() string { return g.lis.Addr().String() }

// Run starts the background loops and answers clients (call Listen first) until ctx
// ends or serving fails, then stops within lifecycle's StopTimeout.
func (g *Gateway) Run(ctx context.Context) error {
	// The refreshes are background polls, not traced; the hub traces each revision.
	go g.view.run(telemetry.Untraced(g.background))
	go g.auth.run(telemetry.Untraced(g.background))
	if g.hub != nil {
		go g.hub.Run(g.background)
	}
	g.log.Info("serving etcd API", "addr", g.Addr())
	errc := grpcsplit.Serve(g.lis, g.log, g.grpc, g.server)
	close(g.ready)
	return lifecycle.Serving(ctx, errc, g.stop)
}

// Ready is closed once Run serves.
func (g *Gateway) Ready() <-chan struct{} { return g.ready }

// stop stops accepting requests and waits for those in flight until ctx ends.
func (g *Gateway) stop(ctx context.Context) error {
	g.stopBackground()
	defer g.view.close()
	g.leases.stop()
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
