package mvcc

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
)

// genKeys are the keys random requests use: few enough that keys are rewritten,
// deleted and re-created often; with zero bytes and prefixes of each other.
var genKeys = []string{"\x00", "a", "a\x00", "a\x00\x00", "a\x00b", "a\x01", "ab", "abc", "b", "b\x00", "ba", "c", "z\xff"}

// genBounds are extra range bounds between and around the keys.
var genBounds = []string{"", "a\x00a", "a\x02", "aa", "b\x01", "bb", "zz", "\xff"}

var genValues = []string{"", "v0", "v1", "v2", "v3", "\x00", "zz", "a\x00b"}

// gen makes random requests that etcd's API layer would accept, from the model's state
// (so that revisions in requests are mostly meaningful).
type gen struct {
	rng *rand.Rand
	m   *model
}

func (g *gen) pick(s []string) string { return s[g.rng.IntN(len(s))] }
func (g *gen) chance(p float64) bool  { return g.rng.Float64() < p }

func (g *gen) key() string { return g.pick(genKeys) }

// bound is a random etcd range.
func (g *gen) bound() rangeBound {
	key := g.key()
	if g.chance(0.1) {
		key = g.pick(genBounds)
	}
	switch p := g.rng.Float64(); {
	case p < 0.35:
		return rangeBound{key, ""}
	case p < 0.45:
		return rangeBound{key, "\x00"}
	case p < 0.6:
		return rangeBound{key, prefixEnd(key)}
	case p < 0.8:
		return rangeBound{key, g.key()}
	default:
		return rangeBound{key, g.pick(genBounds) + g.pick([]string{"", "\x00"})}
	}
}

// revision is 0 (current) mostly, else a revision around the readable window,
// sometimes compacted or in the future.
func (g *gen) revision(valid bool) int64 {
	if g.chance(0.5) {
		return 0
	}
	lo := max(1, g.m.compact)
	if !valid && g.chance(0.3) {
		return max(1, g.m.compact-2) + g.rng.Int64N(g.m.rev+3-max(1, g.m.compact-2))
	}
	return lo + g.rng.Int64N(g.m.rev-lo+1)
}

func (g *gen) rangeReq(valid bool) *pb.RangeRequest {
	b := g.bound()
	r := b.req()
	r.Revision = g.revision(valid)
	if g.chance(0.3) {
		r.Limit = g.rng.Int64N(5)
	}
	if g.chance(0.3) {
		r.SortTarget = pb.RangeRequest_SortTarget(g.rng.IntN(5))
		r.SortOrder = pb.RangeRequest_SortOrder(g.rng.IntN(3))
	}
	if g.chance(0.1) {
		r.KeysOnly = true
	}
	if g.chance(0.1) {
		r.CountOnly = true
	}
	if g.chance(0.15) {
		rev := g.m.rev + 1
		switch g.rng.IntN(4) {
		case 0:
			r.MinModRevision = g.rng.Int64N(rev)
		case 1:
			r.MaxModRevision = g.rng.Int64N(rev)
		case 2:
			r.MinCreateRevision = g.rng.Int64N(rev)
		default:
			r.MaxCreateRevision = g.rng.Int64N(rev)
		}
	}
	return r
}

func (g *gen) putReq(key string) *pb.PutRequest {
	r := &pb.PutRequest{Key: []byte(key), Value: []byte(g.pick(genValues)), PrevKv: g.chance(0.3)}
	switch p := g.rng.Float64(); {
	case p < 0.2:
		r.Lease = 1 + g.rng.Int64N(2) // leases 1 and 2 exist
	case p < 0.23:
		r.Lease = 9 // unknown
	}
	// etcd's API layer rejects ignore_value with a value and ignore_lease with a lease.
	if g.chance(0.08) {
		r.IgnoreValue, r.Value = true, nil
	}
	if g.chance(0.08) {
		r.IgnoreLease, r.Lease = true, 0
	}
	return r
}

func (g *gen) delReq(b rangeBound) *pb.DeleteRangeRequest {
	r := &pb.DeleteRangeRequest{Key: []byte(b.key), PrevKv: g.chance(0.4)}
	if b.end != "" {
		r.RangeEnd = []byte(b.end)
	}
	return r
}

func (g *gen) compare() *pb.Compare {
	b := g.bound()
	if g.chance(0.6) {
		b.end = ""
	}
	c := &pb.Compare{Key: []byte(b.key), RangeEnd: []byte(b.end), Result: pb.Compare_CompareResult(g.rng.IntN(4))}
	rev := g.m.rev + 2
	switch g.rng.IntN(5) {
	case 0:
		c.Target, c.TargetUnion = pb.Compare_VALUE, &pb.Compare_Value{Value: []byte(g.pick(genValues))}
	case 1:
		c.Target, c.TargetUnion = pb.Compare_CREATE, &pb.Compare_CreateRevision{CreateRevision: g.rng.Int64N(rev)}
	case 2:
		c.Target, c.TargetUnion = pb.Compare_MOD, &pb.Compare_ModRevision{ModRevision: g.rng.Int64N(rev)}
	case 3:
		c.Target, c.TargetUnion = pb.Compare_VERSION, &pb.Compare_Version{Version: g.rng.Int64N(5)}
	default:
		c.Target, c.TargetUnion = pb.Compare_LEASE, &pb.Compare_Lease{Lease: g.rng.Int64N(3)}
	}
	return c
}

// written tracks what a txn writes, to follow etcd's duplicate-key rule (a key put
// twice, or put and deleted, in one txn is rejected by the API layer); stricter than
// etcd, it spans both branches. A txn with any set lets keys change more than once,
// as etcd's rule allows in some cases (see TestCompactRemovesSupersededSubRevisions).
type written struct {
	puts map[string]bool
	dels []rangeBound
	any  bool
}

func (w *written) canPut(k string) bool {
	if w.any {
		return true
	}
	if w.puts[k] {
		return false
	}
	for _, d := range w.dels {
		if len(d.bruteForce([]string{k})) > 0 {
			return false
		}
	}
	return true
}

func (w *written) canDelete(b rangeBound) bool {
	if w.any {
		return true
	}
	for k := range w.puts {
		if len(b.bruteForce([]string{k})) > 0 {
			return false
		}
	}
	return true
}

func (g *gen) ops(depth int, w *written, readOnly bool) []*pb.RequestOp {
	n := g.rng.IntN(5)
	var ops []*pb.RequestOp
	for range n {
		p := g.rng.Float64()
		switch {
		case readOnly || p < 0.3:
			ops = append(ops, rangeOp(g.rangeReq(!g.chance(0.05))))
		case p < 0.65:
			k := g.key()
			if !w.canPut(k) {
				ops = append(ops, rangeOp(g.rangeReq(true)))
				continue
			}
			w.puts[k] = true
			ops = append(ops, putReqOp(g.putReq(k)))
		case p < 0.85:
			b := g.bound()
			if !w.canDelete(b) {
				ops = append(ops, rangeOp(g.rangeReq(true)))
				continue
			}
			w.dels = append(w.dels, b)
			ops = append(ops, &pb.RequestOp{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: g.delReq(b)}})
		case depth < 2:
			ops = append(ops, txnOp(g.txn(depth+1, w, false)))
		default:
			ops = append(ops, rangeOp(g.rangeReq(true)))
		}
	}
	return ops
}

func (g *gen) txn(depth int, w *written, readOnly bool) *pb.TxnRequest {
	r := &pb.TxnRequest{}
	for range g.rng.IntN(3) {
		r.Compare = append(r.Compare, g.compare())
	}
	r.Success = g.ops(depth, w, readOnly)
	r.Failure = g.ops(depth, w, readOnly)
	return r
}

func (g *gen) write() proto.Message {
	switch p := g.rng.Float64(); {
	case p < 0.4:
		return g.putReq(g.key())
	case p < 0.58:
		return g.delReq(g.bound())
	case p < 0.985:
		return g.txn(0, &written{puts: map[string]bool{}, any: g.chance(0.05)}, false)
	default:
		// Mostly well behind the current revision so that a long history stays
		// readable; sometimes compacted already or in the future.
		lo := max(0, g.m.compact)
		if g.chance(0.8) {
			return &pb.CompactionRequest{Revision: lo + g.rng.Int64N((g.m.rev-lo)/2+1)}
		}
		return &pb.CompactionRequest{Revision: lo + g.rng.Int64N(g.m.rev-lo+2)}
	}
}

// TestRandomAgainstModel runs random batches of writes (puts, deletes, range deletes,
// nested txns, compactions), reads at random revisions, physical compactions and
// restarts, and checks every response, the revisions and the Pebble keyspace against
// the model. MVCC_SEED replays a run; MVCC_RANDOM_STEPS changes its length.
func TestRandomAgainstModel(t *testing.T) {
	seed := testSeed(t)
	steps := 3000
	if s := os.Getenv("MVCC_RANDOM_STEPS"); s != "" {
		steps, _ = strconv.Atoi(s)
	}
	if testing.Short() {
		steps = 500
	}
	leases := leaseSet{1: true, 2: true}
	e := newEnvWithLeases(t, leases)
	e.commit = pebble.NoSync
	m := newModel(leases)
	g := &gen{rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), m: m}
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d: %s", seed, fmt.Sprintf(format, args...))
	}
	ops := 0
	stats := map[string]int{}
	count := func(r proto.Message, err error) {
		name := strings.TrimPrefix(fmt.Sprintf("%T", r), "*etcdserverpb.")
		if err != nil {
			name += " (" + err.Error() + ")"
		} else if tr, ok := r.(*pb.TxnRequest); ok && len(tr.GetSuccess())+len(tr.GetFailure()) > 0 {
			name += " with ops"
		}
		stats[name]++
	}
	for step := 0; step < steps; step++ {
		if g.chance(0.65) {
			batch := make([]proto.Message, 1+g.rng.IntN(4))
			// The generator reads the model, which lags behind within a batch: fine,
			// the requests need not be meaningful, only valid.
			for i := range batch {
				batch[i] = g.write()
			}
			results := e.applyBatch(batch...)
			for i, r := range batch {
				want, wantErr := m.apply(r)
				got := results[i]
				if !isErr(got.err, wantErr) || (wantErr == nil) != (got.err == nil) {
					fail("step %d, request %d of %d: %v\nerr = %v, want %v", step, i, len(batch), r, got.err, wantErr)
				}
				if wantErr == nil && !proto.Equal(got.resp, want) {
					fail("step %d, request %d of %d: %v%s", step, i, len(batch), r, protoDiff(got.resp, want))
				}
				ops++
				count(r, wantErr)
			}
			if e.s.Rev() != m.rev || e.s.CompactRev() != m.compact {
				fail("step %d: store at rev %d compact %d, model at %d, %d", step, e.s.Rev(), e.s.CompactRev(), m.rev, m.compact)
			}
		} else if g.chance(0.7) {
			r := g.rangeReq(false)
			checkRange(t, e, m, fmt.Sprintf("seed %d step %d", seed, step), r)
			_, err := m.rangeAt(r, m.rev)
			count(r, err)
			ops++
		} else {
			r := g.txn(0, &written{puts: map[string]bool{}}, true)
			got, err := e.readTxn(r)
			want, wantErr := m.readTxn(r)
			if !isErr(err, wantErr) || (wantErr == nil) != (err == nil) || (err == nil && !proto.Equal(got, want)) {
				fail("step %d: read txn %v\nerr = %v, want %v%s", step, r, err, wantErr, protoDiff(got, want))
			}
			count(r, wantErr)
			ops++
		}
		if t.Failed() {
			fail("step %d failed", step)
		}
		if step%300 == 299 && m.compact > 0 {
			e.waitCompacted(m.compact)
			checkKeyspace(t, e, m, fmt.Sprintf("seed %d step %d", seed, step))
		}
		if step%1000 == 999 {
			if step%2000 == 999 {
				e.reopenStore()
			} else {
				e.restart()
			}
		}
	}
	checkAllRevisions(t, e, m, fmt.Sprintf("seed %d, end", seed))
	if m.compact > 0 {
		e.waitCompacted(m.compact)
	}
	checkKeyspace(t, e, m, fmt.Sprintf("seed %d, end", seed))
	t.Logf("%d requests, final revision %d, compacted at %d; %v", ops, m.rev, m.compact, stats)
}
