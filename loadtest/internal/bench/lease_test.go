package bench

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"

	"connectrpc.com/connect"

	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
)

// memLease grants leases and answers keep-alives of the leases it granted.
type memLease struct {
	etcdserverpbconnect.UnimplementedLeaseHandler
	mu                sync.Mutex
	leases            map[int64]int64
	next              int64
	streams, renewals atomic.Int64
}

func (m *memLease) LeaseGrant(ctx context.Context, req *connect.Request[etcdserverpb.LeaseGrantRequest]) (*connect.Response[etcdserverpb.LeaseGrantResponse], error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.next++
	m.leases[m.next] = req.Msg.GetTTL()
	return connect.NewResponse(&etcdserverpb.LeaseGrantResponse{ID: m.next, TTL: req.Msg.GetTTL()}), nil
}

func (m *memLease) LeaseKeepAlive(ctx context.Context, s *connect.BidiStream[etcdserverpb.LeaseKeepAliveRequest, etcdserverpb.LeaseKeepAliveResponse]) error {
	m.streams.Add(1)
	for {
		req, err := s.Receive()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		m.mu.Lock()
		ttl := m.leases[req.GetID()]
		m.mu.Unlock()
		m.renewals.Add(1)
		if err := s.Send(&etcdserverpb.LeaseKeepAliveResponse{ID: req.GetID(), TTL: ttl}); err != nil {
			return err
		}
	}
}

func TestLeaseKeepAlive(t *testing.T) {
	for _, once := range []bool{false, true} {
		ml := &memLease{leases: map[int64]int64{}}
		addr, _ := startServer(t, &memKV{lease: ml})
		cfg := testConfig(addr)
		rep, err := LeaseKeepAlive(context.Background(), cfg, LeaseOptions{TTL: 30, LeasesPerClient: 3, Once: once})
		if err != nil {
			t.Fatal(err)
		}
		checkSane(t, rep)
		if rep.Succeeded != cfg.Total || rep.Failed != 0 {
			t.Fatalf("once=%v: %d succeeded, %d failed; want %d", once, rep.Succeeded, rep.Failed, cfg.Total)
		}
		wantStreams := int64(cfg.Clients)
		if once {
			wantStreams = cfg.Total
		}
		if len(ml.leases) != 3*cfg.Clients || ml.renewals.Load() != cfg.Total || ml.streams.Load() != wantStreams {
			t.Fatalf("once=%v: %d leases, %d renewals over %d streams; want %d, %d, %d",
				once, len(ml.leases), ml.renewals.Load(), ml.streams.Load(), 3*cfg.Clients, cfg.Total, wantStreams)
		}
	}
	if _, err := LeaseKeepAlive(context.Background(), testConfig("127.0.0.1:1"), LeaseOptions{TTL: 0, LeasesPerClient: 1}); err == nil {
		t.Fatal("a TTL of 0 was accepted")
	}
}
