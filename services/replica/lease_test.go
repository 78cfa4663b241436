package replica

import (
	"context"
	"errors"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/kvmesh/kvmesh/libs/etcderr"
	pb "github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
)

// Leases go through Raft: a grant gets an ID and at least the minimum TTL, puts attach
// to it, a revoke deletes its keys in one revision, and all of it survives a restart.
func TestLeasesThroughRaft(t *testing.T) {
	tr := startReplica(t, testConfig(t))
	ctx := context.Background()
	if _, err := tr.r.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: maxLeaseTTL + 1}); !errors.Is(err, etcderr.ErrLeaseTTLTooLarge) {
		t.Fatalf("grant with a too large TTL: %v", err)
	}
	g, err := tr.r.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 0})
	if err != nil {
		t.Fatal(err)
	}
	if g.GetID() <= 0 || g.GetTTL() != tr.r.minLeaseTTL() || g.GetTTL() < 1 || g.GetHeader().GetMemberId() != tr.r.ID() {
		t.Fatalf("grant answered %v; want a positive ID and the minimum TTL %d", g, tr.r.minLeaseTTL())
	}
	if d := (Config{ElectionTicks: 10, TickInterval: 100 * time.Millisecond}); (&Replica{cfg: d}).minLeaseTTL() != 2 {
		t.Fatal("etcd's defaults give a minimum lease TTL of 2 s")
	}
	if _, err := tr.r.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 1000, TTL: 60}); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.r.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 1000, TTL: 60}); !errors.Is(err, etcderr.ErrLeaseExist) {
		t.Fatalf("granting an existing ID: %v", err)
	}
	for _, k := range []string{"l1", "l2"} {
		if _, err := tr.kv.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte(k), Value: []byte("v"), Lease: g.GetID()})); err != nil {
			t.Fatal(err)
		}
	}
	tr.put("other", "v")

	tr = tr.restart()
	rev := tr.put("before-revoke", "v").GetHeader().GetRevision()
	rv, err := tr.r.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: g.GetID()})
	if err != nil {
		t.Fatal(err)
	}
	if rv.GetHeader().GetRevision() != rev+1 {
		t.Fatalf("revoke answered revision %d, want %d (one revision for both keys)", rv.GetHeader().GetRevision(), rev+1)
	}
	for _, k := range []string{"l1", "l2"} {
		if kvs := tr.get(k, 0).GetKvs(); len(kvs) != 0 {
			t.Fatalf("%s survived its lease's revoke: %v", k, kvs)
		}
	}
	if kvs := tr.get("other", 0).GetKvs(); len(kvs) != 1 {
		t.Fatal("revoke deleted a key without the lease")
	}
	if _, err := tr.r.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: g.GetID()}); !errors.Is(err, etcderr.ErrLeaseNotFound) {
		t.Fatalf("revoking twice: %v", err)
	}
	if _, err := tr.kv.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte("x"), Value: []byte("v"), Lease: g.GetID()})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("put with the revoked lease: %v", err)
	}
	if l, ok := tr.r.st.kv.Lease(1000); !ok || l.TTL != 60 {
		t.Fatalf("lease 1000 after restart: %v, %v", l, ok)
	}
}
