package replica

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/kvmesh/kvmesh/api/gen/authpb"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
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
		if _, err := tr.kv.Put(ctx, &pb.PutRequest{Key: []byte(k), Value: []byte("v"), Lease: g.GetID()}); err != nil {
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
	if _, err := tr.kv.Put(ctx, &pb.PutRequest{Key: []byte("x"), Value: []byte("v"), Lease: g.GetID()}); etcderr.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("put with the revoked lease: %v", err)
	}
	if l, ok := tr.r.st.kv.Lease(1000); !ok || l.TTL != 60 {
		t.Fatalf("lease 1000 after restart: %v, %v", l, ok)
	}
}

func timeToLive(t *testing.T, r *Replica, id int64) *pb.LeaseTimeToLiveResponse {
	t.Helper()
	resp, err := (&leaseService{r: r}).LeaseTimeToLive(context.Background(), &pb.LeaseTimeToLiveRequest{ID: id, Keys: true})
	if err != nil {
		t.Fatalf("time to live of %x: %v", id, err)
	}
	return resp
}

func renewOnce(t *testing.T, r *Replica, id int64) *replicav1.KeepAliveResults {
	t.Helper()
	return r.keepAlive(context.Background(), &replicav1.KeepAliveBatch{Seq: 7, Ids: []int64{id}})
}

// The leader's clocks: keep-alives hold a lease without Raft writes, and a lease whose
// keep-alives stop is revoked through Raft with its keys, in one revision.
func TestLeaseKeepAliveAndExpiry(t *testing.T) {
	tr := startReplica(t, testConfig(t))
	ctx := context.Background()
	g, err := tr.r.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 42, TTL: 1})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"a", "b"} {
		if _, err := tr.kv.Put(ctx, &pb.PutRequest{Key: []byte(k), Value: []byte("v"), Lease: g.GetID()}); err != nil {
			t.Fatal(err)
		}
	}
	applied := tr.r.applied.Load()
	for range 10 { // 2 s: twice the TTL
		res := renewOnce(t, tr.r, 42)
		if res.GetNotLeader() || res.GetSeq() != 7 || len(res.GetTtls()) != 1 || res.GetTtls()[0] != 1 || res.GetHeader().GetMemberId() != tr.r.ID() {
			t.Fatalf("keep-alive answered %v", res)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if got := tr.r.applied.Load(); got != applied {
		t.Fatalf("keep-alives wrote to the raft log: applied index %d → %d", applied, got)
	}
	if ttl := timeToLive(t, tr.r, 42); ttl.GetGrantedTTL() != 1 || ttl.GetTTL() < 0 || ttl.GetTTL() > 1 || len(ttl.GetKeys()) != 2 {
		t.Fatalf("time to live of a kept lease: %v", ttl)
	}
	rev := tr.get("a", 0).GetHeader().GetRevision()

	deadline := time.Now().Add(3 * time.Second)
	for len(tr.get("a", 0).GetKvs()) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the lease's key outlived its TTL by 2 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	resp := tr.get("b", 0)
	if len(resp.GetKvs()) != 0 || resp.GetHeader().GetRevision() != rev+1 {
		t.Fatalf("after expiry: b = %v at revision %d; want both keys deleted in revision %d", resp.GetKvs(), resp.GetHeader().GetRevision(), rev+1)
	}
	if ttl := timeToLive(t, tr.r, 42); ttl.GetTTL() != -1 {
		t.Fatalf("time to live of an expired lease: %v, want TTL -1", ttl)
	}
	if res := renewOnce(t, tr.r, 42); res.GetNotLeader() || res.GetTtls()[0] != 0 {
		t.Fatalf("keep-alive of an expired lease answered %v; want TTL 0", res)
	}
}

// A lease whose keep-alives stopped has its remaining TTL checkpointed, so that a new
// leader does not start it over; a renewal clears the checkpoint first.
func TestLeaseCheckpointsSurviveLeaderChange(t *testing.T) {
	members := startCluster(t, 3)
	lead := leader(t, members)
	ctx := context.Background()
	for _, id := range []int64{1, 2} {
		if _, err := lead.r.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: id, TTL: 8}); err != nil {
			t.Fatal(err)
		}
	}
	// Checkpoints begin once half the TTL is left, at the next checkpoint round.
	time.Sleep(5500 * time.Millisecond)
	if res := renewOnce(t, lead.r, 2); res.GetNotLeader() || res.GetTtls()[0] != 8 {
		t.Fatalf("renewal answered %v", res)
	}
	for _, m := range members {
		deadline := time.Now().Add(time.Second)
		for {
			l1, _ := m.r.st.kv.Lease(1)
			l2, _ := m.r.st.kv.Lease(2)
			if l1.Remaining >= 2 && l1.Remaining <= 4 && l2.Remaining == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s holds checkpoints %d and %d; want 2–4 s for the lapsing lease, none for the renewed one", m.cfg.Name, l1.Remaining, l2.Remaining)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	lead.stop(t)
	next := leader(t, members)
	// The extension a new leader grants is one election timeout (100 ms here).
	if ttl := timeToLive(t, next.r, 1); ttl.GetTTL() < 0 || ttl.GetTTL() > 4 {
		t.Fatalf("after the leader change the lapsing lease has TTL %d; want at most its checkpoint", ttl.GetTTL())
	}
	if ttl := timeToLive(t, next.r, 2); ttl.GetTTL() < 6 {
		t.Fatalf("after the leader change the renewed lease has TTL %d; want about its whole TTL", ttl.GetTTL())
	}
	// A deposed leader's lessor entries are ignored: apply compares terms.
	if _, err := next.r.propose(ctx, &replicav1.RaftRequest{LessorTerm: 1,
		Request: &replicav1.RaftRequest_LeaseRevoke{LeaseRevoke: &pb.LeaseRevokeRequest{ID: 2}}}); !errors.Is(err, etcderr.ErrNotLeader) {
		t.Fatalf("a revoke of another term: %v", err)
	}
	if _, ok := next.r.st.kv.Lease(2); !ok {
		t.Fatal("a revoke of another term was applied")
	}
	if res := renewOnce(t, follower(members, next).r, 2); !res.GetNotLeader() {
		t.Fatalf("a follower renewed: %v", res)
	}
}

// An expiry storm is revoked at LeaseRevokeRate, and writes go on meanwhile.
func TestLeaseExpiryStormIsRateLimited(t *testing.T) {
	cfg := testConfig(t)
	cfg.LeaseRevokeRate = 200
	tr := startReplica(t, cfg)
	ctx := context.Background()
	const n = 600
	// The TTL outlasts the granting (on a loaded machine, seconds). No lease expires
	// before a TTL after the first grant began, so the lessor cannot propose a revoke
	// before then: the rate is counted from there. (Not from the last look that found
	// every lease: revokes proposed earlier may still be on their way to apply.)
	const ttl = 3
	began := time.Now().Add(ttl * time.Second)
	for i := range n {
		id := int64(i + 1)
		if _, err := tr.r.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: id, TTL: ttl}); err != nil {
			t.Fatal(err)
		}
		if _, err := tr.kv.Put(ctx, &pb.PutRequest{Key: []byte(fmt.Sprintf("s/%04d", i)), Value: []byte("v"), Lease: id}); err != nil {
			t.Fatal(err)
		}
	}
	left := func() int {
		st := tr.r.acquire()
		defer st.release()
		return len(st.kv.Leases())
	}
	// Wait for the storm to begin, then follow it while writing.
	for left() == n {
		if time.Since(began) > 10*time.Second {
			t.Fatal("no lease expired 10 s after its TTL")
		}
		time.Sleep(5 * time.Millisecond)
	}
	var puts int
	for left() > 0 {
		if time.Since(began) > 10*time.Second {
			t.Fatalf("%d of %d expired leases still there after 10 s", left(), n)
		}
		gone := n - left()
		// At most the rate over the time elapsed, plus the bucket's burst (a tenth of a
		// second's worth), plus one tick's worth: the storm began with a proposal up to
		// a commit before the first revoke was seen.
		rate := float64(cfg.LeaseRevokeRate)
		if limit := int((time.Since(began)+lessorTick).Seconds()*rate) + cfg.LeaseRevokeRate/10 + 1; gone > limit {
			t.Fatalf("%d leases revoked %v into the storm; the rate allows %d", gone, time.Since(began), limit)
		}
		tr.put("writer", fmt.Sprint(puts))
		puts++
	}
	if took := time.Since(began); took < 2*time.Second {
		t.Fatalf("%d leases revoked in %v at %d/s", n, took, cfg.LeaseRevokeRate)
	}
	if puts < 10 {
		t.Fatalf("only %d puts went through during the storm", puts)
	}
	rest, err := tr.kv.Range(ctx, &pb.RangeRequest{Key: []byte("s/"), RangeEnd: []byte("s0"), CountOnly: true})
	if err != nil || rest.GetCount() != 0 {
		t.Fatalf("keys of expired leases remain: %v, %v", rest, err)
	}
}

// With auth enabled the leader checks each keep-alive's user as etcd's
// checkLeaseRenew: one is needed, and one who is not an admin must be allowed to write
// every key of the lease. Refused keep-alives renew nothing; the others of the batch
// are renewed.
func TestKeepAliveAuthCheck(t *testing.T) {
	tr := startReplica(t, testConfig(t))
	ctx := context.Background()
	for _, l := range []struct {
		id  int64
		key string
	}{{1, "/in/a"}, {2, "/out/a"}} {
		if _, err := tr.r.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: l.id, TTL: 60}); err != nil {
			t.Fatal(err)
		}
		if _, err := tr.kv.Put(ctx, &pb.PutRequest{Key: []byte(l.key), Value: []byte("v"), Lease: l.id}); err != nil {
			t.Fatal(err)
		}
	}
	auth := &authService{r: tr.r}
	for _, m := range []*replicav1.AuthRequest{
		{Request: &replicav1.AuthRequest_UserAdd{UserAdd: &pb.AuthUserAddRequest{Name: "root", Options: &authpb.UserAddOptions{NoPassword: true}}}},
		{Request: &replicav1.AuthRequest_UserGrantRole{UserGrantRole: &pb.AuthUserGrantRoleRequest{User: "root", Role: "root"}}},
		{Request: &replicav1.AuthRequest_UserAdd{UserAdd: &pb.AuthUserAddRequest{Name: "w", Options: &authpb.UserAddOptions{NoPassword: true}}}},
		{Request: &replicav1.AuthRequest_RoleAdd{RoleAdd: &pb.AuthRoleAddRequest{Name: "w"}}},
		{Request: &replicav1.AuthRequest_RoleGrantPermission{RoleGrantPermission: &pb.AuthRoleGrantPermissionRequest{Name: "w",
			Perm: &authpb.Permission{PermType: authpb.Permission_WRITE, Key: []byte("/in/"), RangeEnd: []byte("/in0")}}}},
		{Request: &replicav1.AuthRequest_UserGrantRole{UserGrantRole: &pb.AuthUserGrantRoleRequest{User: "w", Role: "w"}}},
	} {
		if _, err := auth.Call(ctx, m); err != nil {
			t.Fatalf("%v: %v", m, err)
		}
	}
	batch := &replicav1.KeepAliveBatch{Seq: 1, Ids: []int64{1, 2, 2, 1, 3}, Users: []string{"w", "w", "root", "", "w"}}
	// Auth disabled: nothing is checked.
	if res := tr.r.keepAlive(ctx, batch); len(res.GetRefused()) != 0 || res.GetTtls()[1] != 60 {
		t.Fatalf("keep-alives with auth disabled: %v", res)
	}
	if _, err := auth.Call(ctx, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_AuthEnable{AuthEnable: &pb.AuthEnableRequest{}}}); err != nil {
		t.Fatal(err)
	}
	res := tr.r.keepAlive(ctx, batch)
	want := map[uint32]string{1: "etcdserver: permission denied", 3: "etcdserver: user name is empty"}
	if len(res.GetRefused()) != len(want) {
		t.Fatalf("refused %v, want %v", res.GetRefused(), want)
	}
	for _, r := range res.GetRefused() {
		if want[r.GetIndex()] != r.GetMessage() {
			t.Errorf("keep-alive %d refused with %q, want %q", r.GetIndex(), r.GetMessage(), want[r.GetIndex()])
		}
	}
	// w renews the lease of its own keys, root any, and an unknown lease answers 0.
	if ttls := res.GetTtls(); ttls[0] != 60 || ttls[1] != 0 || ttls[2] != 60 || ttls[3] != 0 || ttls[4] != 0 {
		t.Fatalf("TTLs %v", ttls)
	}
	// Without users (not one per ID) nothing is checked.
	if res := tr.r.keepAlive(ctx, &replicav1.KeepAliveBatch{Seq: 2, Ids: []int64{2}}); len(res.GetRefused()) != 0 || res.GetTtls()[0] != 60 {
		t.Fatalf("keep-alive without users: %v", res)
	}
}
