package bench

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
)

// conn is one benchmark connection: its own http.Client and Transport, hence
// its own TCP connection speaking gRPC over plaintext HTTP/2 (h2c), like one
// *grpc.ClientConn in etcd's benchmark tool.
type conn struct {
	endpoint  string
	transport *http.Transport
	dialer    *dialer
	kv        etcdserverpbconnect.KVClient
	lease     etcdserverpbconnect.LeaseClient
}

func (c *conn) close() {
	c.dialer.close()
	c.transport.CloseIdleConnections()
}

// dialer hands out one TCP connection that was established before the
// benchmark started (so connection setup is not measured as request latency
// and an unreachable endpoint fails fast), then dials normally should the
// transport ever need to reconnect.
type dialer struct {
	mu  sync.Mutex
	pre net.Conn
	d   net.Dialer
}

func (d *dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	c := d.pre
	d.pre = nil
	d.mu.Unlock()
	if c != nil {
		return c, nil
	}
	return d.d.DialContext(ctx, network, addr)
}

func (d *dialer) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.pre != nil {
		d.pre.Close()
		d.pre = nil
	}
}

// normalizeEndpoint turns "host:port" (or "http://host:port") into the
// "host:port" form used for dialing. https is rejected: the load generator
// speaks plaintext h2c only.
func normalizeEndpoint(ep string) (string, error) {
	ep = strings.TrimSpace(ep)
	switch {
	case strings.HasPrefix(ep, "http://"):
		ep = strings.TrimPrefix(ep, "http://")
	case strings.HasPrefix(ep, "https://"):
		return "", fmt.Errorf("endpoint %q: TLS is not supported, use plaintext host:port", ep)
	}
	ep = strings.TrimSuffix(ep, "/")
	if _, _, err := net.SplitHostPort(ep); err != nil {
		return "", fmt.Errorf("endpoint %q: %v (want host:port)", ep, err)
	}
	return ep, nil
}

// dialConns opens n connections spread round-robin over endpoints.
func dialConns(ctx context.Context, endpoints []string, n int, timeout time.Duration, user, password string) ([]*conn, error) {
	if len(endpoints) == 0 {
		return nil, fmt.Errorf("no endpoints")
	}
	eps := make([]string, len(endpoints))
	for i, ep := range endpoints {
		var err error
		if eps[i], err = normalizeEndpoint(ep); err != nil {
			return nil, err
		}
	}
	conns := make([]*conn, 0, n)
	for i := 0; i < n; i++ {
		ep := eps[i%len(eps)]
		d := &dialer{d: net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}}
		dctx, cancel := context.WithTimeout(ctx, timeout)
		c, err := d.d.DialContext(dctx, "tcp", ep)
		cancel()
		if err != nil {
			closeConns(conns)
			return nil, fmt.Errorf("conn %d: %w", i, err)
		}
		d.pre = c

		protocols := new(http.Protocols)
		protocols.SetUnencryptedHTTP2(true)
		tr := &http.Transport{
			Protocols:   protocols,
			DialContext: d.DialContext,
			// Never open a second TCP connection behind the caller's back when
			// the server's stream limit is reached: queue like grpc-go does.
			HTTP2: &http.HTTP2Config{StrictMaxConcurrentRequests: true},
			// Without this, concurrent first requests each dial (the
			// surplus connections are then closed). One dial at a time
			// keeps this conn at exactly one TCP connection.
			MaxConnsPerHost: 1,
		}
		hc := &http.Client{Transport: tr}
		tok := &tokenInterceptor{}
		kv := etcdserverpbconnect.NewKVClient(hc, "http://"+ep, connect.WithGRPC(), connect.WithInterceptors(tok))
		lease := etcdserverpbconnect.NewLeaseClient(hc, "http://"+ep, connect.WithGRPC(), connect.WithInterceptors(tok))
		c2 := &conn{endpoint: ep, transport: tr, dialer: d, kv: kv, lease: lease}
		conns = append(conns, c2)
		if user != "" {
			auth := etcdserverpbconnect.NewAuthClient(hc, "http://"+ep, connect.WithGRPC())
			actx, cancel := context.WithTimeout(ctx, timeout)
			resp, err := auth.Authenticate(actx, connect.NewRequest(&pb.AuthenticateRequest{Name: user, Password: password}))
			cancel()
			if err != nil {
				closeConns(conns)
				return nil, fmt.Errorf("conn %d: authenticate %s: %w", i, user, err)
			}
			tok.token = resp.Msg.GetToken()
		}
	}
	return conns, nil
}

func closeConns(conns []*conn) {
	for _, c := range conns {
		c.close()
	}
}

// tokenInterceptor sends a connection's auth token with each request, in the "token"
// metadata as clientv3 does. The token is set once, before the run starts.
type tokenInterceptor struct{ token string }

func (t *tokenInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if t.token != "" {
			req.Header().Set("token", t.token)
		}
		return next(ctx, req)
	}
}

func (t *tokenInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		c := next(ctx, spec)
		if t.token != "" {
			c.RequestHeader().Set("token", t.token)
		}
		return c
	}
}

func (t *tokenInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
