package e2e

import (
	"context"
	"slices"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// TestDifferentialLeases sends the same lease requests, edge cases included, to the
// target and to etcd and requires the same answers: errors, IDs, TTLs, revisions,
// keys. TTLs that tick down are compared once rounded to what cannot differ.
func TestDifferentialLeases(t *testing.T) {
	t.Parallel()
	kind := harness.MustTarget(t)
	target := harness.Start(t, kind, harness.Options{Name: "diff-lease-target"})
	oracle := harness.StartEtcd(t, harness.Options{Name: "diff-lease-oracle"})
	type api struct {
		lease pb.LeaseClient
		kv    pb.KVClient
	}
	conn := func(s *harness.Server) api {
		c := etcdclient.NewClient(t, s).ActiveConnection()
		return api{pb.NewLeaseClient(c), pb.NewKVClient(c)}
	}
	tAPI, oAPI := conn(target), conn(oracle)

	// Client-chosen IDs only, so that both servers hold the same leases.
	steps := []struct {
		name string
		call func(ctx context.Context, a api) (proto.Message, error)
	}{
		{"grant 100 ttl 60", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 100, TTL: 60})
		}},
		{"grant 100 again", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 100, TTL: 60})
		}},
		{"grant a negative ID", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: -5, TTL: 30})
		}},
		{"grant ttl 0", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 101, TTL: 0})
		}},
		{"grant a negative TTL", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 102, TTL: -3})
		}},
		{"grant the maximum TTL", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 103, TTL: 9_000_000_000})
		}},
		{"grant above the maximum TTL", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 104, TTL: 9_000_000_001})
		}},
		{"put with lease 100", func(ctx context.Context, a api) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte("l/a"), Value: []byte("v"), Lease: 100})
		}},
		{"put with lease 100, second key", func(ctx context.Context, a api) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte("l/b"), Value: []byte("v"), Lease: 100, PrevKv: true})
		}},
		{"put with an unknown lease", func(ctx context.Context, a api) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte("l/c"), Value: []byte("v"), Lease: 999})
		}},
		{"txn put with an unknown lease", func(ctx context.Context, a api) (proto.Message, error) {
			return a.kv.Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{
				RequestPut: &pb.PutRequest{Key: []byte("l/c"), Value: []byte("v"), Lease: 999}}}}})
		}},
		{"move l/b to lease 101", func(ctx context.Context, a api) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte("l/b"), Value: []byte("w"), Lease: 101, PrevKv: true})
		}},
		{"time to live of 100 with keys", func(ctx context.Context, a api) (proto.Message, error) {
			r, err := a.lease.LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: 100, Keys: true})
			if r != nil && r.TTL > 50 {
				r.TTL = 60 // ticking: only its order of magnitude is compared
			}
			return r, err
		}},
		{"time to live of an unknown lease", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: 999, Keys: true})
		}},
		{"leases", func(ctx context.Context, a api) (proto.Message, error) {
			r, err := a.lease.LeaseLeases(ctx, &pb.LeaseLeasesRequest{})
			if r != nil {
				slices.SortFunc(r.Leases, func(x, y *pb.LeaseStatus) int { return int(x.ID - y.ID) })
			}
			return r, err
		}},
		{"keep alive 101 and an unknown lease", func(ctx context.Context, a api) (proto.Message, error) {
			s, err := a.lease.LeaseKeepAlive(ctx)
			if err != nil {
				return nil, err
			}
			out := &pb.LeaseLeasesResponse{}
			for _, id := range []int64{101, 999} {
				if err := s.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
					return nil, err
				}
				r, err := s.Recv()
				if err != nil {
					return nil, err
				}
				// ID and TTL of each answer, in a message compareResults can diff.
				out.Leases = append(out.Leases, &pb.LeaseStatus{ID: r.ID*1000 + r.TTL})
			}
			s.CloseSend()
			return out, nil
		}},
		{"revoke an unknown lease", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: 999})
		}},
		{"revoke ID 0", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: 0})
		}},
		{"revoke 100", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: 100})
		}},
		{"revoke 103 (no keys)", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: 103})
		}},
		{"revoke 100 again", func(ctx context.Context, a api) (proto.Message, error) {
			return a.lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: 100})
		}},
		{"range after the revokes", func(ctx context.Context, a api) (proto.Message, error) {
			return a.kv.Range(ctx, &pb.RangeRequest{Key: []byte("l/"), RangeEnd: []byte("l0")})
		}},
	}
	for _, s := range steps {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		rt, et := s.call(ctx, tAPI)
		ro, eo := s.call(ctx, oAPI)
		cancel()
		if msg := compareResults(string(kind), "etcd(oracle)", rt, et, ro, eo); msg != "" {
			t.Fatalf("%s: %s", s.name, msg)
		}
	}
}
