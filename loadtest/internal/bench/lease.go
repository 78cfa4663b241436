package bench

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"

	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
)

// LeaseOptions configures the lease-keepalive benchmark.
type LeaseOptions struct {
	// TTL of the granted leases, seconds (etcd's benchmark grants 100).
	TTL int64
	// LeasesPerClient is how many leases each client keeps alive, in turn.
	LeasesPerClient int
	// Once opens a new LeaseKeepAlive stream per keep-alive, as clientv3's
	// KeepAliveOnce and etcd's `benchmark lease-keepalive` do. Otherwise each client
	// keeps one stream open for the whole run, as clientv3's KeepAlive does.
	Once bool
}

// LeaseKeepAlive benchmarks keep-alives: each client grants its leases before the
// run, then renews them one after another, each request waiting for its answer.
func LeaseKeepAlive(ctx context.Context, cfg Config, opts LeaseOptions) (*Report, error) {
	if opts.TTL < 1 {
		return nil, errors.New("ttl must be >= 1")
	}
	if opts.LeasesPerClient < 1 {
		return nil, errors.New("leases-per-client must be >= 1")
	}
	leases := make([][]int64, cfg.Clients)
	streams := make([]*connect.BidiStreamForClient[etcdserverpb.LeaseKeepAliveRequest, etcdserverpb.LeaseKeepAliveResponse], cfg.Clients)
	defer func() {
		for _, s := range streams {
			if s != nil {
				s.CloseRequest()
				s.CloseResponse()
			}
		}
	}()
	// The streams live as long as the run, not as one request.
	streamCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	prepare := func(ctx context.Context, client int, c *conn) error {
		for range opts.LeasesPerClient {
			g, err := c.lease.LeaseGrant(ctx, connect.NewRequest(&etcdserverpb.LeaseGrantRequest{TTL: opts.TTL}))
			if err != nil {
				return err
			}
			leases[client] = append(leases[client], g.Msg.GetID())
		}
		if !opts.Once {
			streams[client] = c.lease.LeaseKeepAlive(streamCtx)
		}
		return nil
	}
	params := map[string]any{"ttl": opts.TTL, "leases_per_client": opts.LeasesPerClient, "once": opts.Once}
	return run(ctx, cfg, "lease-keepalive", params, prepare, func(client int) requestFunc {
		var n int
		return func(ctx context.Context, c *conn, _ int64) error {
			id := leases[client][n%len(leases[client])]
			n++
			s := streams[client]
			if opts.Once {
				s = c.lease.LeaseKeepAlive(ctx)
				defer func() {
					s.CloseRequest()
					s.CloseResponse()
				}()
			}
			if err := s.Send(&etcdserverpb.LeaseKeepAliveRequest{ID: id}); err != nil {
				return err
			}
			resp, err := s.Receive()
			if err != nil {
				return err
			}
			if resp.GetID() != id || resp.GetTTL() <= 0 {
				return fmt.Errorf("keep-alive of lease %x answered lease %x TTL %d", id, resp.GetID(), resp.GetTTL())
			}
			return nil
		}
	})
}
