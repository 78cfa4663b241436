package mvcc

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// Reads (Range, ReadTxn, WaitCompacted) run concurrently with the apply loop and the
// background compactor; each read must see one consistent revision. Run with -race.
func TestConcurrentReadsDuringWritesAndCompaction(t *testing.T) {
	seed := testSeed(t)
	leases := leaseSet{1: true, 2: true}
	m := newModel(leases)
	g := &gen{rng: rand.New(rand.NewPCG(seed, 11)), m: m}

	// The whole history is decided first, so that the readers can consult the model
	// (read-only from then on) while the store is being written.
	type step struct {
		reqs []proto.Message
		want []result
	}
	var steps []step
	for len(steps) < 400 {
		s := step{reqs: make([]proto.Message, 1+g.rng.IntN(4))}
		for i := range s.reqs {
			s.reqs[i] = g.write()
			if g.chance(0.05) {
				lo := max(0, m.compact)
				s.reqs[i] = &pb.CompactionRequest{Revision: lo + g.rng.Int64N(m.rev-lo+1)}
			}
		}
		for _, r := range s.reqs {
			resp, err := m.apply(r)
			s.want = append(s.want, result{resp, err})
		}
		steps = append(steps, s)
	}

	e := newEnvWithLeases(t, leases)
	e.commit = pebble.NoSync
	var done atomic.Bool
	var wg sync.WaitGroup
	var reads atomic.Int64
	errc := make(chan error, 8)
	report := func(err error) {
		select {
		case errc <- err:
		default:
		}
	}
	s := e.s
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			ctx := context.Background()
			for !done.Load() {
				lo, cur := s.CompactRev(), s.Rev()
				rev := max(lo, 1) + rng.Int64N(cur-max(lo, 1)+1)
				key := genKeys[rng.IntN(len(genKeys))]
				b := rangeBound{key, "\x00"}
				if rng.IntN(2) == 0 {
					b.end = prefixEnd(key)
				}
				r := b.req()
				r.Revision = rev
				var resp *pb.RangeResponse
				var err error
				if rng.IntN(3) == 0 {
					var tr *pb.TxnResponse
					tr, err = safeReadTxn(s, &pb.TxnRequest{Success: []*pb.RequestOp{rangeOp(r)}})
					if err == nil {
						resp = tr.GetResponses()[0].GetResponseRange()
					}
				} else {
					resp, err = safeRange(s, r)
				}
				if isErr(err, etcderr.ErrCompacted) {
					// Compacted since the revision was chosen: the compaction is in
					// Pebble a moment before Committed publishes it.
					for i := 0; i < 1000 && s.CompactRev() <= rev; i++ {
						time.Sleep(time.Millisecond)
					}
					if s.CompactRev() > rev {
						continue
					}
				}
				if err != nil {
					report(fmt.Errorf("range %v (compact rev was %d): %w", r, lo, err))
					return
				}
				want := m.liveAt(r.GetKey(), r.GetRangeEnd(), rev)
				if resp.GetCount() != int64(len(want)) || !slicesEqualKV(resp.GetKvs(), want) {
					report(fmt.Errorf("range %v: got %v, want %v", r, resp.GetKvs(), want))
					return
				}
				if h := resp.GetHeader().GetRevision(); h < cur || h > m.rev {
					report(fmt.Errorf("range %v: header revision %d outside [%d, %d]", r, h, cur, m.rev))
					return
				}
				reads.Add(1)
				if c := s.CompactRev(); c > 0 && rng.IntN(50) == 0 {
					if err := s.WaitCompacted(ctx, c); err != nil {
						report(fmt.Errorf("WaitCompacted(%d): %w", c, err))
						return
					}
				}
			}
		}()
	}
	for i, st := range steps {
		for j, got := range e.applyBatch(st.reqs...) {
			want := st.want[j]
			if !isErr(got.err, want.err) || (want.err == nil) != (got.err == nil) || (want.err == nil && !proto.Equal(got.resp, want.resp)) {
				done.Store(true)
				wg.Wait()
				t.Fatalf("seed %d, batch %d request %d %v: err %v (want %v)%s", seed, i, j, st.reqs[j], got.err, want.err, protoDiff(got.resp, want.resp))
			}
		}
		if len(errc) > 0 {
			break
		}
	}
	done.Store(true)
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Errorf("seed %d: concurrent reader: %v", seed, err)
	}
	t.Logf("%d concurrent reads checked", reads.Load())
}

func slicesEqualKV[T proto.Message](a, b []T) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !proto.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}
