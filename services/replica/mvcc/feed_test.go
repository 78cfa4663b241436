package mvcc

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// The history a feed reads must be exactly the difference between consecutive
// revisions as Range sees them (Range is checked against a model elsewhere), with
// prev_kv the key's version one revision earlier.
func TestChangesMatchRangesAtEachRevision(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(testSeed(t), 7))
	key := func() []byte { return []byte(fmt.Sprintf("k%02d", rng.IntN(12))) }
	for range 400 {
		switch n := rng.IntN(10); {
		case n < 6:
			e.mustPut(string(key()), fmt.Sprint(rng.Int()))
		case n < 8:
			k := key()
			e.apply(&pb.DeleteRangeRequest{Key: k, RangeEnd: append(k[:len(k)-1:len(k)-1], k[len(k)-1]+3)})
		default:
			// Delete a range, then put into it, in one revision.
			k := key()
			e.apply(&pb.TxnRequest{Success: []*pb.RequestOp{
				{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: &pb.DeleteRangeRequest{Key: []byte("k"), RangeEnd: []byte("l")}}},
				{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: k, Value: []byte("v")}}},
			}})
		}
	}
	ctx := context.Background()
	var all []Change
	for from := int64(1); ; {
		chs, pos, err := e.s.Changes(ctx, from, 1024, true)
		if err != nil {
			t.Fatalf("Changes(%d): %v", from, err)
		}
		if len(chs) == 0 {
			if pos.Rev != from-1 {
				t.Fatalf("Changes(%d) read nothing at revision %d", from, pos.Rev)
			}
			break
		}
		all = append(all, chs...)
		from = chs[len(chs)-1].Rev + 1
	}
	if len(all) != int(e.s.Rev()) || len(all[0].Events) != 0 {
		t.Fatalf("%d changes for revisions 1..%d, the first with %d events", len(all), e.s.Rev(), len(all[0].Events))
	}
	// Without prev_kv: the same events, none with prev_kv.
	bare, _, err := e.s.Changes(ctx, 1, 1<<30, false)
	if err != nil || len(bare) != len(all) {
		t.Fatalf("Changes without prev_kv: %d changes, %v; want %d", len(bare), err, len(all))
	}
	for i, c := range bare {
		if c.Rev != all[i].Rev || len(c.Events) != len(all[i].Events) {
			t.Fatalf("revision %d without prev_kv: %d events, want %d", c.Rev, len(c.Events), len(all[i].Events))
		}
		for j, ev := range c.Events {
			if ev.PrevKv != nil || ev.Type != all[i].Events[j].Type || !proto.Equal(ev.Kv, all[i].Events[j].Kv) {
				t.Fatalf("revision %d event %d without prev_kv: %v, want %v without prev_kv", c.Rev, j, ev, all[i].Events[j])
			}
		}
	}
	all = all[1:]
	state := func(rev int64) map[string]*mvccpb.KeyValue {
		m := map[string]*mvccpb.KeyValue{}
		if rev < 1 {
			return m
		}
		for _, kv := range e.mustRange(&pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0}, Revision: rev}).Kvs {
			m[string(kv.Key)] = kv
		}
		return m
	}
	for i, c := range all {
		if c.Rev != int64(i)+2 {
			t.Fatalf("change %d has revision %d", i, c.Rev)
		}
		before, after := state(c.Rev-1), state(c.Rev)
		touched := map[string]bool{}
		for _, ev := range c.Events {
			k := string(ev.Kv.Key)
			if !proto.Equal(ev.PrevKv, before[k]) {
				t.Fatalf("rev %d %s %q: prev_kv %v, want %v", c.Rev, ev.Type, k, ev.PrevKv, before[k])
			}
			touched[k] = true
		}
		// The last event of each key decides its state after the revision.
		last := map[string]*mvccpb.Event{}
		for _, ev := range c.Events {
			last[string(ev.Kv.Key)] = ev
		}
		for k, ev := range last {
			switch ev.Type {
			case mvccpb.Event_PUT:
				if !proto.Equal(ev.Kv, after[k]) {
					t.Fatalf("rev %d put %q: %v, want %v", c.Rev, k, ev.Kv, after[k])
				}
			case mvccpb.Event_DELETE:
				if after[k] != nil || ev.Kv.ModRevision != c.Rev {
					t.Fatalf("rev %d delete %q: tombstone %v, state after %v", c.Rev, k, ev.Kv, after[k])
				}
			}
		}
		for k := range after {
			if !touched[k] && !proto.Equal(after[k], before[k]) {
				t.Fatalf("rev %d changed %q without an event", c.Rev, k)
			}
		}
		for k := range before {
			if !touched[k] && after[k] == nil {
				t.Fatalf("rev %d deleted %q without an event", c.Rev, k)
			}
		}
	}
}

func TestChangesAroundCompaction(t *testing.T) {
	e := newEnv(t)
	e.mustPut("a", "1") // 2
	e.mustPut("a", "2") // 3
	e.mustPut("b", "1") // 4
	e.mustPut("a", "3") // 5
	e.mustCompact(4)
	e.waitCompacted(4)
	ctx := context.Background()
	if _, pos, err := e.s.Changes(ctx, 3, 1<<20, true); !errors.Is(err, etcderr.ErrCompacted) || pos.CompactRev != 4 {
		t.Fatalf("Changes(3) after compaction at 4: %v, %+v", err, pos)
	}
	chs, pos, err := e.s.Changes(ctx, 4, 1<<20, true)
	if err != nil || pos.Rev != 5 || len(chs) != 2 {
		t.Fatalf("Changes(4): %v, %+v, %d changes", err, pos, len(chs))
	}
	// Revision 4's prev_kv would be read at 3, which is compacted: none, as in etcd.
	if chs[0].Events[0].PrevKv != nil {
		t.Fatalf("prev_kv below the compacted revision: %v", chs[0].Events[0].PrevKv)
	}
	if got := string(chs[1].Events[0].PrevKv.GetValue()); got != "2" {
		t.Fatalf("prev_kv of a at 5 = %q, want 2", got)
	}
}

func TestChangedWakesOnCommitAndClose(t *testing.T) {
	e := newEnv(t)
	ch := e.s.Changed()
	e.mustPut("a", "1")
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("Changed not closed by a commit")
	}
	ch = e.s.Changed()
	e.s.Close()
	e.s = nil
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("Changed not closed by Close")
	}
	e.openStore()
}
