package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	elpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	lockpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// recipeAPI is one server's clients for the Lock and Election services, with the KV
// and Lease clients the tests check them with.
type recipeAPI struct {
	lock     lockpb.LockClient
	election elpb.ElectionClient
	kv       pb.KVClient
	lease    pb.LeaseClient
}

func newRecipeAPI(t *testing.T, endpoint string) recipeAPI {
	c := etcdclient.NewClientFor(t, endpoint).ActiveConnection()
	return recipeAPI{lockpb.NewLockClient(c), elpb.NewElectionClient(c), pb.NewKVClient(c), pb.NewLeaseClient(c)}
}

// pending is a call running in the background (a Lock or Campaign that waits).
type pending struct {
	done chan struct{}
	res  proto.Message
	err  error
}

func start(ctx context.Context, f func(ctx context.Context) (proto.Message, error)) *pending {
	p := &pending{done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.res, p.err = f(ctx)
	}()
	return p
}

func (p *pending) returned() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *pending) wait(t *testing.T, what string) (proto.Message, error) {
	t.Helper()
	select {
	case <-p.done:
		return p.res, p.err
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: still waiting after 20s", what)
		return nil, nil
	}
}

// waitKey waits until key exists (a waiter has joined the queue).
func waitKey(t *testing.T, ctx context.Context, a recipeAPI, key string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		r, err := a.kv.Range(ctx, &pb.RangeRequest{Key: []byte(key)})
		if err == nil && len(r.Kvs) == 1 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("key %q never appeared", key)
}

// observer collects what an Observe stream sends.
type observer struct {
	msgs chan *elpb.LeaderResponse
	err  chan error
}

func observe(ctx context.Context, a recipeAPI, name string) (*observer, error) {
	s, err := a.election.Observe(ctx, &elpb.LeaderRequest{Name: []byte(name)})
	if err != nil {
		return nil, err
	}
	o := &observer{msgs: make(chan *elpb.LeaderResponse, 64), err: make(chan error, 1)}
	go func() {
		for {
			m, err := s.Recv()
			if err != nil {
				o.err <- err
				return
			}
			o.msgs <- m
		}
	}()
	return o, nil
}

func (o *observer) next(t *testing.T, what string) *elpb.LeaderResponse {
	t.Helper()
	select {
	case m := <-o.msgs:
		return m
	case err := <-o.err:
		t.Fatalf("%s: observe ended: %v", what, err)
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: nothing observed in 10s", what)
	}
	return nil
}

// TestDifferentialLockElection drives the Lock and Election services of the target
// and of a real etcd through the same script, uncontended and contended, and requires
// the same answers: keys, revisions, leader values, errors, and what Observe streams.
// Leases are granted with IDs of the test's choosing, so the keys (which carry the
// lease ID) are the same on both.
func TestDifferentialLockElection(t *testing.T) {
	t.Parallel()
	kind := harness.MustTarget(t)
	target := harness.Start(t, kind, harness.Options{Name: "diff-lock-target"})
	oracle := harness.StartEtcd(t, harness.Options{Name: "diff-lock-oracle"})
	apis := []recipeAPI{newRecipeAPI(t, target.Endpoint()), newRecipeAPI(t, oracle.Endpoint())}
	names := []string{string(kind), "etcd(oracle)"}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	compare := func(what string, f func(a recipeAPI) (proto.Message, error)) {
		t.Helper()
		rt, et := f(apis[0])
		ro, eo := f(apis[1])
		if msg := compareResults(names[0], names[1], rt, et, ro, eo); msg != "" {
			t.Errorf("%s: %s", what, msg)
		}
	}
	// both runs f on both servers at once (for the waits) and returns the two pendings.
	both := func(f func(ctx context.Context, a recipeAPI) (proto.Message, error)) [2]*pending {
		return [2]*pending{
			start(ctx, func(ctx context.Context) (proto.Message, error) { return f(ctx, apis[0]) }),
			start(ctx, func(ctx context.Context) (proto.Message, error) { return f(ctx, apis[1]) }),
		}
	}
	settle := func(what string, p [2]*pending) {
		t.Helper()
		rt, et := p[0].wait(t, what+" on "+names[0])
		ro, eo := p[1].wait(t, what+" on "+names[1])
		if msg := compareResults(names[0], names[1], rt, et, ro, eo); msg != "" {
			t.Errorf("%s: %s", what, msg)
		}
	}
	stillWaiting := func(what string, p [2]*pending) {
		t.Helper()
		time.Sleep(300 * time.Millisecond)
		for i := range p {
			if p[i].returned() {
				t.Fatalf("%s on %s returned while it should wait: %v %v", what, names[i], p[i].res, p[i].err)
			}
		}
	}
	onBoth := func(f func(a recipeAPI)) {
		for _, a := range apis {
			f(a)
		}
	}

	for _, id := range []int64{0x101, 0x102, 0x103, 0x104} {
		compare(fmt.Sprintf("grant %x", id), func(a recipeAPI) (proto.Message, error) {
			return a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: id, TTL: 600})
		})
	}
	lock := func(name string, lease int64) func(a recipeAPI) (proto.Message, error) {
		return func(a recipeAPI) (proto.Message, error) {
			return a.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte(name), Lease: lease})
		}
	}
	unlock := func(key string) func(a recipeAPI) (proto.Message, error) {
		return func(a recipeAPI) (proto.Message, error) {
			return a.lock.Unlock(ctx, &lockpb.UnlockRequest{Key: []byte(key)})
		}
	}

	// Uncontended, again with the same lease, and the errors.
	compare("lock l", lock("l", 0x101))
	compare("lock l again with the same lease", lock("l", 0x101))
	compare("lock with a lease that does not exist", lock("l", 0x999))
	compare("lock an empty name", lock("", 0x101))
	compare("unlock a key that is not there", unlock("nope"))
	compare("unlock an empty key", unlock(""))
	// Lease 0: a lease of 60s is granted for the lock; its ID is the server's.
	for i, a := range apis {
		r, err := a.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte("l0")})
		if err != nil || !strings.HasPrefix(string(r.GetKey()), "l0/") {
			t.Errorf("%s: lock with lease 0: %v %v", names[i], r, err)
			continue
		}
		id := strings.TrimPrefix(string(r.GetKey()), "l0/")
		var lease int64
		fmt.Sscanf(id, "%x", &lease)
		ttl, err := a.lease.LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: lease})
		if err != nil || ttl.GrantedTTL != 60 {
			t.Errorf("%s: the lease of a lock given lease 0: %v %v", names[i], ttl, err)
		}
	}

	// Contended: the second waits until the first unlocks, then holds it.
	second := both(func(ctx context.Context, a recipeAPI) (proto.Message, error) {
		return a.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte("l"), Lease: 0x102})
	})
	onBoth(func(a recipeAPI) { waitKey(t, ctx, a, "l/102") })
	stillWaiting("the second lock", second)
	// A third waiter whose lease is revoked while it waits: once the others are
	// gone it finds its key gone, "mutex: session is expired".
	third := both(func(ctx context.Context, a recipeAPI) (proto.Message, error) {
		return a.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte("l"), Lease: 0x103})
	})
	onBoth(func(a recipeAPI) { waitKey(t, ctx, a, "l/103") })
	stillWaiting("the third lock", third)
	compare("revoke the third's lease", func(a recipeAPI) (proto.Message, error) {
		return a.lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: 0x103})
	})
	compare("unlock the first", unlock("l/101"))
	settle("the second lock, after the first unlocked", second)
	stillWaiting("the third lock", third)
	compare("unlock the second", unlock("l/102"))
	if strings.Contains(harness.EtcdVersion(), " 3.4.") {
		// etcd 3.4's Mutex did not look for its key after waiting and answered
		// success; 3.5 and later answer "mutex: session is expired", as kvmesh.
		_, err := third[0].wait(t, "the third lock")
		if err == nil || !strings.Contains(err.Error(), "mutex: session is expired") {
			t.Errorf("the third lock, whose lease was revoked: %v", err)
		}
		third[1].wait(t, "the third lock on etcd")
	} else {
		settle("the third lock, whose lease was revoked", third)
	}

	// A waiter that gives up takes its key back: the next in line is not held up by it.
	onBoth(func(a recipeAPI) {
		if _, err := a.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte("g"), Lease: 0x101}); err != nil {
			t.Fatalf("lock g: %v", err)
		}
	})
	for i, a := range apis {
		gctx, gcancel := context.WithTimeout(ctx, 500*time.Millisecond)
		_, err := a.lock.Lock(gctx, &lockpb.LockRequest{Name: []byte("g"), Lease: 0x102})
		gcancel()
		if err == nil {
			t.Fatalf("%s: a lock held by another returned", names[i])
		}
	}
	// Checked on the target only: etcd's cleanup races the caller's exit and may
	// leave the key to its lease.
	for deadline := time.Now().Add(5 * time.Second); ; {
		r, err := apis[0].kv.Range(ctx, &pb.RangeRequest{Key: []byte("g/102")})
		if err == nil && len(r.Kvs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the key of a waiter that gave up is still there: %v %v", names[0], r, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	onBoth(func(a recipeAPI) {
		if _, err := a.kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte("g/"), RangeEnd: []byte("g0")}); err != nil {
			t.Fatal(err)
		}
	})

	// Election.
	campaign := func(name string, lease int64, value string) func(a recipeAPI) (proto.Message, error) {
		return func(a recipeAPI) (proto.Message, error) {
			return a.election.Campaign(ctx, &elpb.CampaignRequest{Name: []byte(name), Lease: lease, Value: []byte(value)})
		}
	}
	leader := func(name string) func(a recipeAPI) (proto.Message, error) {
		return func(a recipeAPI) (proto.Message, error) {
			return a.election.Leader(ctx, &elpb.LeaderRequest{Name: []byte(name)})
		}
	}
	compare("leader of an election nobody runs", leader("e"))
	compare("proclaim without a leader key", func(a recipeAPI) (proto.Message, error) {
		return a.election.Proclaim(ctx, &elpb.ProclaimRequest{Value: []byte("x")})
	})
	compare("resign without a leader key", func(a recipeAPI) (proto.Message, error) {
		return a.election.Resign(ctx, &elpb.ResignRequest{})
	})
	compare("campaign with a lease that does not exist", campaign("e", 0x999, "a"))

	obs := make([]*observer, 2)
	for i, a := range apis {
		o, err := observe(ctx, a, "e")
		if err != nil {
			t.Fatalf("%s: observe: %v", names[i], err)
		}
		obs[i] = o
	}
	observed := func(what string) {
		t.Helper()
		mt, mo := obs[0].next(t, what+" on "+names[0]), obs[1].next(t, what+" on "+names[1])
		if msg := compareResults(names[0], names[1], mt, nil, mo, nil); msg != "" {
			t.Errorf("observed %s: %s", what, msg)
		}
	}
	compare("campaign e", campaign("e", 0x101, "a"))
	observed("the first leader")
	compare("campaign again with another value", campaign("e", 0x101, "b"))
	observed("the value campaigned again")
	compare("leader", leader("e"))
	lk := &elpb.LeaderKey{Name: []byte("e"), Key: []byte("e/101"), Lease: 0x101}
	onBoth(func(a recipeAPI) {
		r, err := a.election.Leader(ctx, &elpb.LeaderRequest{Name: []byte("e")})
		if err != nil {
			t.Fatal(err)
		}
		lk.Rev = r.Kv.CreateRevision
	})
	next := both(func(ctx context.Context, a recipeAPI) (proto.Message, error) {
		return a.election.Campaign(ctx, &elpb.CampaignRequest{Name: []byte("e"), Lease: 0x102, Value: []byte("c")})
	})
	onBoth(func(a recipeAPI) { waitKey(t, ctx, a, "e/102") })
	stillWaiting("the second campaign", next)
	compare("proclaim", func(a recipeAPI) (proto.Message, error) {
		return a.election.Proclaim(ctx, &elpb.ProclaimRequest{Leader: lk, Value: []byte("d")})
	})
	observed("the proclamation")
	stale := proto.Clone(lk).(*elpb.LeaderKey)
	stale.Rev--
	compare("proclaim with a stale leader key", func(a recipeAPI) (proto.Message, error) {
		return a.election.Proclaim(ctx, &elpb.ProclaimRequest{Leader: stale, Value: []byte("x")})
	})
	compare("resign with a stale leader key", func(a recipeAPI) (proto.Message, error) {
		return a.election.Resign(ctx, &elpb.ResignRequest{Leader: stale})
	})
	stillWaiting("the second campaign", next)
	compare("resign", func(a recipeAPI) (proto.Message, error) {
		return a.election.Resign(ctx, &elpb.ResignRequest{Leader: lk})
	})
	settle("the second campaign, after the leader resigned", next)
	observed("the next leader")
	compare("proclaim after resigning", func(a recipeAPI) (proto.Message, error) {
		return a.election.Proclaim(ctx, &elpb.ProclaimRequest{Leader: lk, Value: []byte("x")})
	})
	compare("leader after the change", leader("e"))
	// The last leader's lease ends: nobody leads, and the next campaign is observed.
	compare("revoke the leader's lease", func(a recipeAPI) (proto.Message, error) {
		return a.lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: 0x102})
	})
	compare("leader of an election whose leader is gone", leader("e"))
	compare("campaign e once more", campaign("e", 0x104, "z"))
	observed("the leader after an empty election")
}

// errObserveRefused stands for any failed Observe: where etcd ends the stream
// without a word (a step of its recipe failed), kvmesh answers the step's error.
var errObserveRefused = errors.New("observe refused")

// observeFirst opens an Observe stream and answers its first response.
func observeFirst(ctx context.Context, a recipeAPI, name string) (proto.Message, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	s, err := a.election.Observe(ctx, &elpb.LeaderRequest{Name: []byte(name)})
	if err != nil {
		return nil, errObserveRefused
	}
	m, err := s.Recv()
	if err != nil { // io.EOF from etcd
		return nil, errObserveRefused
	}
	return m, nil
}

// TestEtcdctlLockElect: etcdctl's lock and elect (clientv3's recipes, run by etcdctl)
// and the Lock and Election RPCs take the same locks and elections.
func TestEtcdctlLockElect(t *testing.T) {
	t.Parallel()
	srv := shared(t)
	bin, err := harness.EtcdctlBinary()
	if err != nil {
		harness.SkipOrFail(t, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a := newRecipeAPI(t, srv.Endpoint())
	etcdctl := func(args ...string) (*exec.Cmd, *syncBuffer, chan error) {
		cmd := exec.CommandContext(ctx, bin, append([]string{"--endpoints=" + srv.Endpoint()}, args...)...)
		cmd.Env = append(os.Environ(), "ETCDCTL_API=3")
		out := &syncBuffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		return cmd, out, done
	}
	count := func(prefix string) int64 {
		r, err := a.kv.Range(ctx, &pb.RangeRequest{Key: []byte(prefix), RangeEnd: []byte(prefix[:len(prefix)-1] + "0"), CountOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		return r.Count
	}
	until := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not after 10s", what)
			}
		}
	}

	// The RPC holds the lock: etcdctl lock waits for it, then runs its command.
	lease, err := a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	held, err := a.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte("/ctl/lock"), Lease: lease.ID})
	if err != nil {
		t.Fatal(err)
	}
	_, out, done := etcdctl("lock", "/ctl/lock", "echo", "got-it")
	until("etcdctl lock joins the waiters", func() bool { return count("/ctl/lock/") == 2 })
	select {
	case err := <-done:
		t.Fatalf("etcdctl lock ran its command while the RPC holds the lock: %v\n%s", err, out)
	case <-time.After(300 * time.Millisecond):
	}
	if _, err := a.lock.Unlock(ctx, &lockpb.UnlockRequest{Key: held.Key}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil || !strings.Contains(out.String(), "got-it") {
			t.Fatalf("etcdctl lock: %v\n%s", err, out)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("etcdctl lock still waits after the unlock:\n%s", out)
	}
	if n := count("/ctl/lock/"); n != 0 {
		t.Fatalf("%d lock keys left", n)
	}

	// etcdctl elect leads; a Campaign RPC waits until etcdctl is interrupted.
	cmd, out, done := etcdctl("elect", "/ctl/elect", "prop-1")
	until("etcdctl elect leads", func() bool {
		r, err := a.election.Leader(ctx, &elpb.LeaderRequest{Name: []byte("/ctl/elect")})
		return err == nil && string(r.Kv.Value) == "prop-1"
	})
	lease2, err := a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	camp := start(ctx, func(ctx context.Context) (proto.Message, error) {
		return a.election.Campaign(ctx, &elpb.CampaignRequest{Name: []byte("/ctl/elect"), Lease: lease2.ID, Value: []byte("rpc")})
	})
	until("the campaign joins", func() bool { return count("/ctl/elect/") == 2 })
	time.Sleep(300 * time.Millisecond)
	if camp.returned() {
		t.Fatalf("the campaign won while etcdctl leads: %v %v", camp.res, camp.err)
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if _, err := camp.wait(t, "the campaign after etcdctl resigned"); err != nil {
		t.Fatalf("campaign: %v (etcdctl: %v)", err, out)
	}
	<-done
	r, err := a.election.Leader(ctx, &elpb.LeaderRequest{Name: []byte("/ctl/elect")})
	if err != nil || string(r.Kv.Value) != "rpc" {
		t.Fatalf("leader after etcdctl resigned: %v %v", r, err)
	}
}

// syncBuffer is a bytes.Buffer safe for a process's output and the test's reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
