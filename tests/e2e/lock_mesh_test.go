package e2e

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	elpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	lockpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// TestMeshLockElection runs the Lock and Election services on the mesh (3 replicas,
// two gateways). Workers on both gateways take one lock in turns, half through the
// Lock RPC and half with clientv3's client-side Mutex (the same keys, so the two
// interoperate as on etcd); none ever finds another inside, and the counter they guard
// loses no increment. Then candidates campaign through both gateways while an
// observer on one of them sees each leader in turn, the leader changing as each
// resigns, and a waiting lock survives a kill -9 of the Raft leader.
func TestMeshLockElection(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("the mesh is kvmesh's own")
	}
	t.Parallel()
	m := startMesh(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	clis := []*clientv3.Client{etcdclient.NewClientFor(t, m.endpoints[0]), etcdclient.NewClientFor(t, m.endpoints[1])}
	apis := []recipeAPI{newRecipeAPI(t, m.endpoints[0]), newRecipeAPI(t, m.endpoints[1])}

	// --- Mutual exclusion --------------------------------------------------------
	const workers, rounds = 4, 5
	var inside atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cli, api := clis[w%2], apis[w%2]
			sess, err := concurrency.NewSession(cli, concurrency.WithTTL(30))
			if err != nil {
				errs <- err
				return
			}
			defer sess.Close()
			for range rounds {
				var key []byte
				if w < 2 {
					r, err := api.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte("/locks/counter"), Lease: int64(sess.Lease())})
					if err != nil {
						errs <- fmt.Errorf("worker %d: Lock: %w", w, err)
						return
					}
					key = r.Key
				} else {
					mu := concurrency.NewMutex(sess, "/locks/counter")
					if err := mu.Lock(ctx); err != nil {
						errs <- fmt.Errorf("worker %d: Mutex.Lock: %w", w, err)
						return
					}
					key = []byte(mu.Key())
				}
				if n := inside.Add(1); n != 1 {
					errs <- fmt.Errorf("worker %d: %d holders of the lock at once", w, n)
					return
				}
				got, err := cli.Get(ctx, "/counter")
				if err != nil {
					errs <- err
					return
				}
				n := 0
				if len(got.Kvs) == 1 {
					n, _ = strconv.Atoi(string(got.Kvs[0].Value))
				}
				time.Sleep(5 * time.Millisecond)
				if _, err := cli.Put(ctx, "/counter", strconv.Itoa(n+1)); err != nil {
					errs <- err
					return
				}
				inside.Add(-1)
				if _, err := api.lock.Unlock(ctx, &lockpb.UnlockRequest{Key: key}); err != nil {
					errs <- fmt.Errorf("worker %d: Unlock: %w", w, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := mustGet(t, clis[0], "/counter"); string(got.Kvs[0].Value) != strconv.Itoa(workers*rounds) {
		t.Fatalf("counter %s after %d increments under the lock", got.Kvs[0].Value, workers*rounds)
	}
	if got := mustGet(t, clis[0], "/locks/counter/", clientv3.WithPrefix()); got.Count != 0 {
		t.Fatalf("lock keys left after every worker unlocked: %v", fmtKVs(got.Kvs))
	}

	// --- Election ----------------------------------------------------------------
	obs, err := observe(ctx, apis[1], "/elect/app")
	if err != nil {
		t.Fatal(err)
	}
	type candidate struct {
		leader *elpb.LeaderKey
		done   chan error
	}
	var cands []*candidate
	for i := range 3 {
		lease, err := clis[i%2].Grant(ctx, 60)
		if err != nil {
			t.Fatal(err)
		}
		c := &candidate{done: make(chan error, 1)}
		cands = append(cands, c)
		go func() {
			r, err := apis[i%2].election.Campaign(ctx, &elpb.CampaignRequest{Name: []byte("/elect/app"), Lease: int64(lease.ID), Value: []byte(fmt.Sprintf("cand-%d", i))})
			if err == nil {
				c.leader = r.Leader
			}
			c.done <- err
		}()
		// Campaigns join in this order (each key is in before the next campaigns).
		waitKey(t, ctx, apis[0], fmt.Sprintf("/elect/app/%x", int64(lease.ID)))
	}
	for i, c := range cands {
		select {
		case err := <-c.done:
			if err != nil {
				t.Fatalf("candidate %d: %v", i, err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("candidate %d never became leader", i)
		}
		for j := i + 1; j < len(cands); j++ {
			select {
			case err := <-cands[j].done:
				t.Fatalf("candidate %d won while %d leads: %v", j, i, err)
			default:
			}
		}
		if got := obs.next(t, fmt.Sprintf("leader %d", i)); string(got.Kv.Value) != fmt.Sprintf("cand-%d", i) {
			t.Fatalf("observed %q, want cand-%d", got.Kv.Value, i)
		}
		if i == 0 {
			if _, err := apis[0].election.Proclaim(ctx, &elpb.ProclaimRequest{Leader: c.leader, Value: []byte("cand-0 again")}); err != nil {
				t.Fatal(err)
			}
			if got := obs.next(t, "the proclamation"); string(got.Kv.Value) != "cand-0 again" {
				t.Fatalf("observed %q, want the proclamation", got.Kv.Value)
			}
		}
		l, err := apis[0].election.Leader(ctx, &elpb.LeaderRequest{Name: []byte("/elect/app")})
		if err != nil || string(l.Kv.Key) != string(c.leader.Key) {
			t.Fatalf("Leader while candidate %d leads: %v %v", i, l, err)
		}
		if _, err := apis[1].election.Resign(ctx, &elpb.ResignRequest{Leader: c.leader}); err != nil {
			t.Fatal(err)
		}
	}

	// --- A waiting lock across a kill -9 of the Raft leader ----------------------
	holder, err := clis[0].Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	held, err := apis[0].lock.Lock(ctx, &lockpb.LockRequest{Name: []byte("/locks/kill"), Lease: int64(holder.ID)})
	if err != nil {
		t.Fatal(err)
	}
	waiter, err := clis[1].Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	p := start(ctx, func(ctx context.Context) (proto.Message, error) {
		return apis[1].lock.Lock(ctx, &lockpb.LockRequest{Name: []byte("/locks/kill"), Lease: int64(waiter.ID)})
	})
	waitKey(t, ctx, apis[1], fmt.Sprintf("/locks/kill/%x", int64(waiter.ID)))
	leaderProc(t, m, clis[0]).kill()
	time.Sleep(500 * time.Millisecond)
	if p.returned() {
		t.Fatalf("the waiting lock returned while the lock is held: %v %v", p.res, p.err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; {
		_, err := apis[0].lock.Unlock(ctx, &lockpb.UnlockRequest{Key: held.Key})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Unlock after the leader kill: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if _, err := p.wait(t, "the waiting lock after the holder unlocked"); err != nil {
		t.Fatalf("the waiting lock: %v", err)
	}
}
