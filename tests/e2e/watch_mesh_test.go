package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// validatedWatch records one watcher's responses for the validator.
type validatedWatch struct {
	name string
	from int64

	mu        sync.Mutex
	responses [][]*mvccpb.Event
	errs      []string
	done      chan struct{}
}

func (v *validatedWatch) run(ctx context.Context, cli *clientv3.Client, prefix string) {
	wch := cli.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(v.from), clientv3.WithPrevKV())
	v.done = make(chan struct{})
	go func() {
		defer close(v.done)
		for resp := range wch {
			v.mu.Lock()
			if err := resp.Err(); err != nil && ctx.Err() == nil {
				v.errs = append(v.errs, err.Error())
			}
			if len(resp.Events) > 0 {
				evs := make([]*mvccpb.Event, len(resp.Events))
				for i, ev := range resp.Events {
					evs[i] = (*mvccpb.Event)(ev)
				}
				v.responses = append(v.responses, evs)
			}
			v.mu.Unlock()
		}
	}()
}

// lastRevision is the revision of the last event received.
func (v *validatedWatch) lastRevision() int64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.responses) == 0 {
		return 0
	}
	r := v.responses[len(v.responses)-1]
	return r[len(r)-1].Kv.ModRevision
}

// eventKey names an event for comparisons.
func eventKey(ev *mvccpb.Event) string {
	return fmt.Sprintf("%d %s %s=%s", ev.Kv.ModRevision, ev.Type, ev.Kv.Key, ev.Kv.Value)
}

// validate checks the watch guarantees of one watcher: ordered (revisions never go
// back), unique (no event twice), atomic (a revision's events all in one response),
// reliable (every acknowledged write delivered, the same events as the reference
// watcher), and returns its events.
func (v *validatedWatch) validate(acked map[int64]string, from, to int64) (events []string, violations []string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	seen := map[string]bool{}
	respOf := map[int64]int{}
	last := int64(0)
	for i, resp := range v.responses {
		for _, ev := range resp {
			rev := ev.Kv.ModRevision
			if rev > to {
				continue
			}
			if rev < last {
				violations = append(violations, fmt.Sprintf("%s: ordered: revision %d after %d", v.name, rev, last))
			}
			last = rev
			k := eventKey(ev)
			if seen[k] {
				violations = append(violations, fmt.Sprintf("%s: unique: %s twice", v.name, k))
			}
			seen[k] = true
			if j, ok := respOf[rev]; ok && j != i {
				violations = append(violations, fmt.Sprintf("%s: atomic: revision %d split over responses %d and %d", v.name, rev, j, i))
			}
			respOf[rev] = i
			events = append(events, k)
		}
	}
	for rev, what := range acked {
		if rev >= from && rev <= to {
			if _, ok := respOf[rev]; !ok {
				violations = append(violations, fmt.Sprintf("%s: reliable: acknowledged revision %d (%s) never delivered", v.name, rev, what))
			}
		}
	}
	for _, e := range v.errs {
		violations = append(violations, fmt.Sprintf("%s: watch error: %s", v.name, e))
	}
	return events, violations
}

// TestMeshWatchValidatorUnderFaults runs watchers on both gateways while a writer
// changes keys (puts, deletes, multi-key txns) and the mesh suffers: the fanout is
// killed and restarted, a second fanout runs beside the first, NATS is killed and
// restarted, the leader replica is killed and restarted, a third gateway joins and
// catches a watcher up from the first revision. Every watcher must deliver the same
// events, ordered, unique, atomic per revision, with every acknowledged write; a
// watcher canceled midway and resumed from its next revision must continue exactly.
func TestMeshWatchValidatorUnderFaults(t *testing.T) {
	m := startMesh(t, 3)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clis := []*clientv3.Client{etcdclient.NewClientFor(t, m.endpoints[0]), etcdclient.NewClientFor(t, m.endpoints[1])}
	base, err := clis[0].Put(ctx, "w/base", "0")
	if err != nil {
		t.Fatal(err)
	}
	from := base.Header.Revision + 1

	var watches []*validatedWatch
	cancelable, cancelOne := context.WithCancel(ctx)
	for i := range 4 {
		w := &validatedWatch{name: fmt.Sprintf("g%d-w%d", i%2, i), from: from}
		wctx := ctx
		if i == 3 {
			wctx = cancelable
		}
		// A separate client per watcher: clientv3 shares one stream per context.
		w.run(wctx, etcdclient.NewClientFor(t, m.endpoints[i%2]), "w/")
		watches = append(watches, w)
	}

	// The writers: every acknowledged revision is recorded.
	stop := make(chan struct{})
	log := startWriters(ctx, clis, 2, "w/", 20, stop)

	pause := func(d time.Duration) { time.Sleep(d) }
	pause(2 * time.Second)

	t.Log("fault: kill -9 the fanout, restart it after 3s")
	m.fanouts[0].kill()
	pause(3 * time.Second)
	m.fanouts[0].start()
	pause(2 * time.Second)

	t.Log("fault: a second fanout beside the first")
	f1 := m.fanoutProc("f1")
	m.fanouts = append(m.fanouts, f1)
	m.all = append(m.all, f1)
	f1.start()
	pause(2 * time.Second)

	t.Log("fault: cancel a watcher and resume it from its next revision")
	cancelOne()
	<-watches[3].done
	resumedFrom := watches[3].lastRevision() + 1
	cont := &validatedWatch{name: "g1-w3-resumed", from: resumedFrom}
	cont.run(ctx, clis[1], "w/")
	watches = append(watches, cont)

	t.Log("fault: kill -9 NATS, restart it after 2s")
	m.nats.kill()
	pause(2 * time.Second)
	m.nats.start()
	pause(3 * time.Second)

	t.Log("fault: kill -9 the leader replica, restart it after 3s")
	lead := leaderProc(t, m, clis[0])
	lead.kill()
	pause(3 * time.Second)
	lead.start()
	pause(2 * time.Second)

	t.Log("a third gateway joins; a watcher on it starts from the first revision")
	g2 := m.gatewayProc("g2", 2)
	m.gateways = append(m.gateways, g2)
	m.all = append(m.all, g2)
	g2.start()
	m.waitHealthy(m.endpoints[2])
	cli2 := etcdclient.NewClientFor(t, m.endpoints[2])
	late := &validatedWatch{name: "g2-late", from: from}
	late.run(ctx, cli2, "w/")
	watches = append(watches, late)
	pause(2 * time.Second)

	acked := log.stop(stop)
	end, err := clis[0].Put(ctx, "w/end", "1")
	if err != nil {
		t.Fatal(err)
	}
	to := end.Header.Revision
	deadline := time.Now().Add(30 * time.Second)
	for _, w := range watches {
		for w.lastRevision() < to && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
	}

	var reference []string
	var all []string
	for i, w := range watches {
		evs, violations := w.validate(acked, w.from, to)
		if w == watches[3] {
			// Canceled midway: checked up to where it stopped.
			evs, violations = w.validate(nil, w.from, resumedFrom-1)
		}
		all = append(all, violations...)
		switch {
		case i == 0:
			reference = evs
		case w == watches[3]:
			if !prefixOf(evs, reference) {
				all = append(all, fmt.Sprintf("%s: its events are not the reference's up to where it was canceled", w.name))
			}
		case w == cont:
			if want := eventsFrom(reference, resumedFrom); strings.Join(evs, "\n") != strings.Join(want, "\n") {
				all = append(all, fmt.Sprintf("%s: resumed at %d: %d events, the reference has %d from there", w.name, resumedFrom, len(evs), len(want)))
			}
		default:
			if strings.Join(evs, "\n") != strings.Join(reference, "\n") {
				all = append(all, fmt.Sprintf("%s: %d events differ from the reference's %d", w.name, len(evs), len(reference)))
			}
		}
	}
	if len(all) > 0 {
		sort.Strings(all)
		t.Fatalf("%d watch violations (of %d acknowledged writes up to revision %d):\n%s", len(all), len(acked), to, strings.Join(all[:min(len(all), 40)], "\n"))
	}
	t.Logf("%d watchers agree on %d events over revisions %d-%d (%d acknowledged writes); zero violations", len(watches), len(reference), from, to, len(acked))
}

// writeLog is what the writers of startWriters had acknowledged: the revision of each
// write, and what it was.
type writeLog struct {
	mu    sync.Mutex
	acked map[int64]string
	wg    sync.WaitGroup
}

// startWriters runs n writers, each through clis[i % len(clis)], until stop is closed:
// puts (six in ten), two-key txns and deletes of a key and the keys under it, on keys
// prefix0 … prefix<keys-1> and under them, each with a deadline of 3 s.
func startWriters(ctx context.Context, clis []*clientv3.Client, n int, prefix string, keys int, stop <-chan struct{}) *writeLog {
	l := &writeLog{acked: map[int64]string{}}
	for c := range n {
		l.wg.Go(func() {
			cli := clis[c%len(clis)]
			rng := rand.New(rand.NewPCG(uint64(c), 42))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := fmt.Sprintf("%s%d", prefix, rng.IntN(keys))
				cctx, ccancel := context.WithTimeout(ctx, 3*time.Second)
				var rev int64
				var what string
				switch n := rng.IntN(10); {
				case n < 6:
					if r, err := cli.Put(cctx, k, fmt.Sprint(c, "-", i)); err == nil {
						rev, what = r.Header.Revision, "put "+k
					}
				case n < 8:
					if r, err := cli.Txn(cctx).Then(clientv3.OpPut(k+"/a", fmt.Sprint(i)), clientv3.OpPut(k+"/b", fmt.Sprint(i))).Commit(); err == nil {
						rev, what = r.Header.Revision, "txn "+k
					}
				default:
					if r, err := cli.Delete(cctx, k, clientv3.WithPrefix()); err == nil && r.Deleted > 0 {
						rev, what = r.Header.Revision, "delete "+k
					}
				}
				ccancel()
				if rev > 0 {
					l.mu.Lock()
					l.acked[rev] = what
					l.mu.Unlock()
				}
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
	return l
}

// stop waits for the writers, which stop was closed for, and answers what they wrote.
func (l *writeLog) stop(stop chan struct{}) map[int64]string {
	close(stop)
	l.wg.Wait()
	return l.acked
}

func prefixOf(a, b []string) bool {
	return len(a) <= len(b) && strings.Join(a, "\n") == strings.Join(b[:len(a)], "\n")
}

func eventsFrom(evs []string, rev int64) []string {
	for i, e := range evs {
		var r int64
		fmt.Sscan(e, &r)
		if r >= rev {
			return evs[i:]
		}
	}
	return nil
}
