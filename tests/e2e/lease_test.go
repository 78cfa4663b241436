package e2e

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// The Lease API through clientv3, against the selected target (etcd validates the
// tests). The timed tests run in parallel, each on a server of its own.

func leaseServerClient(t *testing.T) *clientv3.Client {
	t.Helper()
	t.Parallel()
	return etcdclient.NewClient(t, harness.StartTarget(t))
}

// TestLeaseGrantRevokeTimeToLive covers grants (server and client IDs, minimum TTL,
// errors), TimeToLive with keys, Leases, and a revoke deleting its keys.
func TestLeaseGrantRevokeTimeToLive(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	ctx := ctxT(t)
	raw := pb.NewLeaseClient(cli.ActiveConnection())

	r0 := currentRev(t, cli)
	g, err := cli.Grant(ctx, 60)
	requireOK(t, "Grant", err)
	t.Cleanup(func() { cli.Revoke(context.Background(), g.ID) })
	if g.ID <= 0 || g.TTL != 60 {
		t.Fatalf("Grant 60: ID %x TTL %d", g.ID, g.TTL)
	}
	checkHeader(t, "Grant", g.ResponseHeader, r0)

	// etcd's minimum TTL with its default election timeout (1 s) is 2 s.
	short, err := cli.Grant(ctx, 1)
	requireOK(t, "Grant 1", err)
	if short.TTL != 2 {
		t.Fatalf("Grant 1 answered TTL %d, want the minimum 2", short.TTL)
	}
	_, err = cli.Grant(ctx, 9_000_000_001)
	requireEtcdErr(t, "Grant above the maximum TTL", err, rpctypes.ErrLeaseTTLTooLarge)

	mine := time.Now().UnixNano()&0x7fff_ffff_ffff | 0x1000_0000_0000
	c, err := raw.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: mine, TTL: 30})
	requireOK(t, "Grant with an ID", err)
	if c.ID != mine || c.TTL != 30 {
		t.Fatalf("Grant with ID %x answered %x TTL %d", mine, c.ID, c.TTL)
	}
	_, err = raw.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: mine, TTL: 30})
	requireEtcdErr(t, "Grant of an existing ID", err, rpctypes.ErrLeaseExist)

	for _, k := range []string{"b", "a"} {
		mustPut(t, cli, p+k, "v", clientv3.WithLease(g.ID))
	}
	mustPut(t, cli, p+"other", "v")
	ttl, err := cli.TimeToLive(ctx, g.ID, clientv3.WithAttachedKeys())
	requireOK(t, "TimeToLive", err)
	keys := []string{}
	for _, k := range ttl.Keys {
		keys = append(keys, string(k))
	}
	slices.Sort(keys)
	if ttl.ID != g.ID || ttl.GrantedTTL != 60 || ttl.TTL < 55 || ttl.TTL > 60 || !slices.Equal(keys, []string{p + "a", p + "b"}) {
		t.Fatalf("TimeToLive: ID %x granted %d TTL %d keys %q", ttl.ID, ttl.GrantedTTL, ttl.TTL, keys)
	}
	if ttl, err := cli.TimeToLive(ctx, 0x7e57_0000_0000_0099); err != nil || ttl.TTL != -1 {
		t.Fatalf("TimeToLive of an unknown lease: %v, %v; want TTL -1", ttl, err)
	}
	ls, err := cli.Leases(ctx)
	requireOK(t, "Leases", err)
	var ids []clientv3.LeaseID
	for _, l := range ls.Leases {
		ids = append(ids, l.ID)
	}
	for _, id := range []clientv3.LeaseID{g.ID, short.ID, clientv3.LeaseID(mine)} {
		if !slices.Contains(ids, id) {
			t.Fatalf("Leases %x lacks %x", ids, id)
		}
	}

	// Revoke: both keys go in one revision; a lease without keys writes none.
	r1 := currentRev(t, cli)
	rv, err := cli.Revoke(ctx, g.ID)
	requireOK(t, "Revoke", err)
	checkHeader(t, "Revoke", rv.Header, r1+1)
	if got := mustGet(t, cli, p, clientv3.WithPrefix()); !equalStrings(keysOf(got.Kvs, p), []string{"other"}) {
		t.Fatalf("after Revoke: %s", fmtKVs(got.Kvs))
	}
	rv, err = cli.Revoke(ctx, clientv3.LeaseID(mine))
	requireOK(t, "Revoke without keys", err)
	checkHeader(t, "Revoke without keys", rv.Header, r1+1)
	_, err = cli.Revoke(ctx, g.ID)
	requireEtcdErr(t, "Revoke twice", err, rpctypes.ErrLeaseNotFound)
	_, err = cli.KeepAliveOnce(ctx, g.ID)
	requireEtcdErr(t, "KeepAliveOnce of a revoked lease", err, rpctypes.ErrLeaseNotFound)
	_, err = cli.Put(ctx, p+"c", "v", clientv3.WithLease(g.ID))
	requireEtcdErr(t, "Put with a revoked lease", err, rpctypes.ErrLeaseNotFound)
	if ttl, err := cli.TimeToLive(ctx, g.ID); err != nil || ttl.TTL != -1 {
		t.Fatalf("TimeToLive of a revoked lease: %v, %v; want TTL -1", ttl, err)
	}
	_, _ = cli.Revoke(ctx, short.ID)
}

// TestLeaseExpiryDeletesKeysForWatchers: a lease nobody keeps alive expires; its keys
// go in one revision, and a watcher sees the DELETE events.
func TestLeaseExpiryDeletesKeysForWatchers(t *testing.T) {
	cli := leaseServerClient(t)
	ctx := ctxT(t)
	g, err := cli.Grant(ctx, 2)
	requireOK(t, "Grant", err)
	var rev int64
	for _, k := range []string{"x/1", "x/2"} {
		rev = mustPut(t, cli, k, "v", clientv3.WithLease(g.ID)).Header.Revision
	}
	mustPut(t, cli, "x/keep", "v")
	start := time.Now()
	wc := cli.Watch(ctx, "x/", clientv3.WithPrefix(), clientv3.WithRev(rev+2))
	select {
	case resp := <-wc:
		if resp.Err() != nil || len(resp.Events) != 2 {
			t.Fatalf("watch: %v, %d events; want the two deletions", resp.Err(), len(resp.Events))
		}
		for i, ev := range resp.Events {
			if ev.Type != mvccpb.DELETE || string(ev.Kv.Key) != fmt.Sprintf("x/%d", i+1) || ev.Kv.ModRevision != rev+2 {
				t.Fatalf("event %d: %v %q at %d; want DELETE x/%d at %d", i, ev.Type, ev.Kv.Key, ev.Kv.ModRevision, i+1, rev+2)
			}
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the lease's keys were not deleted within 10 s of a 2 s TTL")
	}
	if d := time.Since(start); d < 1500*time.Millisecond {
		t.Fatalf("the lease expired after %v, before its TTL", d)
	}
	if got := mustGet(t, cli, "x/", clientv3.WithPrefix()); !equalStrings(keysOf(got.Kvs, "x/"), []string{"keep"}) {
		t.Fatalf("after expiry: %s", fmtKVs(got.Kvs))
	}
	if ttl, err := cli.TimeToLive(ctx, g.ID); err != nil || ttl.TTL != -1 {
		t.Fatalf("TimeToLive of an expired lease: %v, %v", ttl, err)
	}
}

// TestLeaseKeepAliveHoldsKeys: keep-alives on one stream hold many leases past their
// TTL; once they stop, the leases expire.
func TestLeaseKeepAliveHoldsKeys(t *testing.T) {
	cli := leaseServerClient(t)
	ctx := ctxT(t)
	kctx, stop := context.WithCancel(ctx)
	const n = 20
	ids := make([]clientv3.LeaseID, n)
	var wg sync.WaitGroup
	counts := make([]int, n)
	for i := range n {
		g, err := cli.Grant(ctx, 2)
		requireOK(t, "Grant", err)
		ids[i] = g.ID
		mustPut(t, cli, fmt.Sprintf("k/%02d", i), "v", clientv3.WithLease(g.ID))
		ch, err := cli.KeepAlive(kctx, g.ID)
		requireOK(t, "KeepAlive", err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ka := range ch {
				if ka.ID != g.ID || ka.TTL != 2 {
					t.Errorf("keep-alive of %x answered %x TTL %d", g.ID, ka.ID, ka.TTL)
				}
				counts[i]++
			}
		}()
	}
	time.Sleep(5 * time.Second)
	if got := mustGet(t, cli, "k/", clientv3.WithPrefix(), clientv3.WithCountOnly()); got.Count != n {
		t.Fatalf("%d of %d kept keys left after 2.5 TTLs", got.Count, n)
	}
	stop()
	wg.Wait()
	for i, c := range counts {
		if c < 3 {
			t.Fatalf("lease %d got %d keep-alive answers in 5 s of a 2 s TTL", i, c)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for mustGet(t, cli, "k/", clientv3.WithPrefix(), clientv3.WithCountOnly()).Count != 0 {
		if time.Now().After(deadline) {
			t.Fatal("keys outlived their leases by 10 s after the keep-alives stopped")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestMeshLeasesAcrossLeaderKill: on the mesh, kill -9 the leader while
// - one lease is kept alive (its stream carries on through the gateway),
// - one is left to lapse (its checkpointed TTL is not reset by the new leader),
// - a concurrency session holds a lock (the lock holds and is handed over after).
func TestMeshLeasesAcrossLeaderKill(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("the mesh is kvmesh's own")
	}
	t.Parallel()
	m := startMesh(t, 3)
	cli, err := clientv3.New(etcdclient.ClientConfig(m.endpoints...))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx := ctxT(t)

	kept, err := cli.Grant(ctx, 4)
	requireOK(t, "Grant kept", err)
	mustPut(t, cli, "kept", "v", clientv3.WithLease(kept.ID))
	kctx, stopKeep := context.WithCancel(context.Background())
	defer stopKeep()
	ch, err := cli.KeepAlive(kctx, kept.ID)
	requireOK(t, "KeepAlive", err)
	answers := make(chan time.Time, 1000)
	go func() {
		for range ch {
			answers <- time.Now()
		}
		close(answers)
	}()

	lapsing, err := cli.Grant(ctx, 10)
	requireOK(t, "Grant lapsing", err)
	granted := time.Now()
	mustPut(t, cli, "lapsing", "v", clientv3.WithLease(lapsing.ID))

	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	requireOK(t, "NewSession", err)
	defer sess.Close()
	mu := concurrency.NewMutex(sess, "/lock/")
	requireOK(t, "Lock", mu.Lock(ctx))

	time.Sleep(7 * time.Second) // past half of lapsing's TTL: checkpointed
	leader := leaderProc(t, m, cli)
	leader.kill()
	killed := time.Now()

	// The lapsing lease keeps what was left of it (plus at most an election timeout
	// and a checkpoint interval), never its whole TTL again.
	var ttl *clientv3.LeaseTimeToLiveResponse
	for {
		ttl, err = cli.TimeToLive(ctxT(t), lapsing.ID)
		if err == nil {
			break
		}
		if time.Since(killed) > 10*time.Second {
			t.Fatalf("TimeToLive after the leader kill: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The new leader restarts the lease's clock from its last checkpoint (at most a
	// checkpoint interval old when the leader died) plus an election timeout, as etcd
	// does; from the kill until it took over, the clock did not run. So what it reports
	// may exceed what is truly left by the time from the kill to the answer, a
	// checkpoint interval, an election timeout and a second of rounding up; but never
	// reach the whole TTL again.
	left := time.Until(granted.Add(10 * time.Second))
	slack := time.Since(killed) + 3*time.Second
	if ttl.TTL < 0 || ttl.TTL >= 10 || time.Duration(ttl.TTL)*time.Second > left+slack {
		t.Fatalf("after the leader change the lapsing lease has TTL %d s; %v were left of it (%v since the kill)", ttl.TTL, left.Round(time.Second), time.Since(killed).Round(100*time.Millisecond))
	}
	if got := mustGet(t, cli, "lapsing"); got.Count != 1 && time.Since(granted) < 9*time.Second {
		t.Fatalf("the lapsing lease's key went %v after the grant, before its TTL", time.Since(granted))
	}

	// A second session cannot take the lock while the first holds it.
	other, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	requireOK(t, "second NewSession", err)
	defer other.Close()
	mu2 := concurrency.NewMutex(other, "/lock/")
	if err := mu2.TryLock(ctxT(t)); err != concurrency.ErrLocked {
		t.Fatalf("TryLock while the first session holds the lock: %v", err)
	}

	// Wait out two of the kept lease's TTLs after the kill.
	time.Sleep(time.Until(killed.Add(8 * time.Second)))
	var late []time.Time
	for len(answers) > 0 {
		late = append(late, <-answers)
	}
	if len(late) == 0 || late[len(late)-1].Before(killed.Add(4*time.Second)) {
		t.Fatalf("keep-alives stopped being answered after the leader kill (last answers %v)", late)
	}
	if got := mustGet(t, cli, "kept"); got.Count != 1 {
		t.Fatal("the kept lease's key is gone")
	}
	select {
	case <-sess.Done():
		t.Fatal("the lock holder's session ended across the failover")
	default:
	}
	// The lapsing lease is gone by its TTL plus a small bound.
	deadline := granted.Add(16 * time.Second)
	for mustGet(t, cli, "lapsing").Count != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the lapsing lease's key outlived its 10 s TTL by 6 s")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The lock passes on when its holder lets go.
	requireOK(t, "Unlock", mu.Unlock(ctxT(t)))
	requireOK(t, "second Lock", mu2.Lock(ctxT(t)))
	requireOK(t, "second Unlock", mu2.Unlock(ctxT(t)))
}
