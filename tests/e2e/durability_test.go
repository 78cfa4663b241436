package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

const (
	durWriters    = 16
	durLoad       = 3 * time.Second
	durCycles     = 3
	durPutTimeout = 5 * time.Second
	durPrefix     = "dur/"
)

// durAck is an acknowledged put.
type durAck struct {
	val string
	rev int64
}

// TestDurabilityKill9 writes with 16 concurrent clients, SIGKILLs the server
// mid-load, restarts it on the same data directory and checks that every
// acknowledged put survived with its value and revision, that nothing was
// applied twice and that revisions stay dense. Three kill/restart cycles.
// It runs against the selected target (etcd with KVMESH_E2E_TARGET=etcd,
// which validates the test itself).
func TestDurabilityKill9(t *testing.T) {
	t.Parallel() // own servers only; never touches the shared one
	s := harness.StartTarget(t, harness.Options{Name: "durability"})
	base := func() int64 {
		cli := etcdclient.NewClient(t, s)
		defer cli.Close()
		return currentRev(t, cli)
	}()

	acked := map[string]durAck{}   // every acknowledged put
	unknown := map[string]string{} // puts whose outcome is unknown (error)
	var preKillErrs []string

	for cycle := range durCycles {
		cli, err := clientv3.New(etcdclient.ClientConfig(s.Endpoint()))
		if err != nil {
			t.Fatalf("cycle %d: client: %v", cycle, err)
		}
		var (
			mu     sync.Mutex
			killed atomic.Bool
			stop   atomic.Bool
			wg     sync.WaitGroup
			nAck   int
		)
		for w := range durWriters {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(cycle), uint64(w)))
				for n := 0; !stop.Load(); n++ {
					key := fmt.Sprintf("%sc%d/w%02d/%07d", durPrefix, cycle, w, n)
					val := fmt.Sprintf("%d/%d/%d/%x", cycle, w, n, rng.Uint64())
					ctx, cancel := context.WithTimeout(context.Background(), durPutTimeout)
					resp, err := cli.Put(ctx, key, val)
					cancel()
					mu.Lock()
					if err == nil {
						acked[key] = durAck{val: val, rev: resp.Header.Revision}
						nAck++
					} else {
						unknown[key] = val
						if !killed.Load() {
							preKillErrs = append(preKillErrs, fmt.Sprintf("cycle %d %s: %s", cycle, key, errDesc(err)))
						}
					}
					mu.Unlock()
					if err != nil && killed.Load() {
						return
					}
				}
			})
		}
		time.Sleep(durLoad)
		mu.Lock()
		before := nAck
		mu.Unlock()
		killed.Store(true)
		s.Kill()
		stop.Store(true)
		waitTimeout(t, &wg, durPutTimeout+5*time.Second, "writers to stop after the kill")
		_ = cli.Close()
		t.Logf("cycle %d: %d puts acknowledged before SIGKILL, %d in total; %d outcomes unknown so far",
			cycle, before, nAck, len(unknown))
		if nAck == 0 {
			t.Fatalf("cycle %d: no put was acknowledged in %v; the test proves nothing", cycle, durLoad)
		}

		s.Restart()
		verifyDurability(t, s, cycle, base, acked, unknown)
	}
	// Failed puts before the kill are legitimate now and then (etcd answers
	// "too many requests" when its apply loop lags), and they count as
	// unknown outcomes above; a server that fails much of this load is
	// broken, though.
	if len(preKillErrs) > 0 {
		n := min(len(preKillErrs), 10)
		t.Logf("%d puts failed before any kill; first ones:\n%s", len(preKillErrs), joinLines(preKillErrs[:n]))
		if total := len(acked) + len(unknown); len(preKillErrs)*10 > total {
			t.Errorf("%d of %d puts failed before any kill: the server does not sustain %d concurrent writers", len(preKillErrs), total, durWriters)
		}
	}
}

// verifyDurability checks the store after a restart.
func verifyDurability(t *testing.T, s *harness.Server, cycle int, base int64, acked map[string]durAck, unknown map[string]string) {
	t.Helper()
	cli := etcdclient.NewClient(t, s)
	kvs, rev := rangeAll(t, cli, durPrefix)
	present := make(map[string]*mvccpb.KeyValue, len(kvs))
	for _, kv := range kvs {
		present[string(kv.Key)] = kv
	}
	var errs []string
	report := func(format string, args ...any) {
		if len(errs) < 20 {
			errs = append(errs, fmt.Sprintf(format, args...))
		}
	}

	maxAck := int64(0)
	lost := 0
	for k, a := range acked {
		maxAck = max(maxAck, a.rev)
		kv, ok := present[k]
		switch {
		case !ok:
			lost++
			report("acknowledged put %s (revision %d) is lost", k, a.rev)
		case string(kv.Value) != a.val:
			report("acknowledged put %s: value %q, want %q", k, kv.Value, a.val)
		case kv.ModRevision != a.rev || kv.CreateRevision != a.rev:
			report("acknowledged put %s: create/mod revision %d/%d, want %d as the put returned", k, kv.CreateRevision, kv.ModRevision, a.rev)
		case kv.Version != 1:
			report("acknowledged put %s: version %d, want 1 (written once; applied twice?)", k, kv.Version)
		}
	}
	appliedUnknown := 0
	for k, kv := range present {
		if _, ok := acked[k]; ok {
			continue
		}
		v, ok := unknown[k]
		switch {
		case !ok:
			report("key %s is present but was never written", k)
		case string(kv.Value) != v:
			report("put %s with unknown outcome: value %q, want %q", k, kv.Value, v)
		case kv.Version != 1:
			report("put %s with unknown outcome: version %d, want 1", k, kv.Version)
		default:
			appliedUnknown++
		}
	}
	if rev < maxAck {
		report("store revision %d is below the highest acknowledged revision %d", rev, maxAck)
	}
	// Each applied put is one revision: the mod revisions of our keys are
	// exactly base+1..rev, with no gaps and no duplicates.
	want := base + int64(len(acked)-lost) + int64(appliedUnknown)
	if rev != want {
		report("store revision %d, want %d = %d (start) + %d acknowledged + %d applied with unknown outcome",
			rev, want, base, len(acked)-lost, appliedUnknown)
	}
	revs := make([]int64, 0, len(kvs))
	for _, kv := range kvs {
		revs = append(revs, kv.ModRevision)
	}
	sort.Slice(revs, func(i, j int) bool { return revs[i] < revs[j] })
	for i, r := range revs {
		if r != base+1+int64(i) {
			report("mod revisions are not exactly %d..%d: position %d holds %d (neighbours %v)",
				base+1, rev, i, r, revs[max(0, i-2):min(len(revs), i+3)])
			break
		}
	}
	t.Logf("cycle %d after restart: revision %d, %d keys: %d acknowledged, %d of %d unknown-outcome puts applied",
		cycle, rev, len(kvs), len(acked), appliedUnknown, len(unknown))
	if len(errs) > 0 {
		t.Fatalf("cycle %d: durability violated after SIGKILL and restart:\n%s", cycle, joinLines(errs))
	}
	// The restarted server accepts writes and continues the revision sequence.
	r, err := cli.Txn(ctxT(t)).Commit()
	requireOK(t, "empty txn after restart", err)
	if r.Header.Revision != rev {
		t.Fatalf("cycle %d: revision %d after restart, %d before", cycle, r.Header.Revision, rev)
	}
}

// rangeAll reads every key under prefix with paginated, consistent (same
// revision) ranges and returns them with the store revision.
func rangeAll(t *testing.T, cli *clientv3.Client, prefix string) ([]*mvccpb.KeyValue, int64) {
	t.Helper()
	end := clientv3.GetPrefixRangeEnd(prefix)
	var out []*mvccpb.KeyValue
	key, rev := prefix, int64(0)
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(2000)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := cli.Get(ctxT(t), key, opts...)
		requireOK(t, "paginated range", err)
		if rev == 0 {
			rev = resp.Header.Revision
		}
		out = append(out, resp.Kvs...)
		if !resp.More || len(resp.Kvs) == 0 {
			return out, rev
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

func waitTimeout(t *testing.T, wg *sync.WaitGroup, d time.Duration, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("timed out after %v waiting for %s", d, what)
	}
}

func joinLines(s []string) string {
	var b []byte
	for _, l := range s {
		b = append(b, "  "...)
		b = append(b, l...)
		b = append(b, '\n')
	}
	return string(b)
}
