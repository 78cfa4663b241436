package mvcc

import (
	"math/rand/v2"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
)

func TestRestartKeepsRevisionDataAndHistory(t *testing.T) {
	for _, tc := range []struct {
		name    string
		restart func(e *testEnv)
	}{
		{"new Store on the open db", (*testEnv).reopenStore},
		{"db closed and reopened", (*testEnv).restart},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			m := newModel(leaseSet{})
			rng := rand.New(rand.NewPCG(3, 4))
			keys := []string{"a", "a\x00", "ab", "b", "\x00"}
			randomHistory(t, e, m, rng, keys, 50)
			// A last batch whose requests change nothing must not lose the revision.
			for i, res := range e.applyBatch(&pb.DeleteRangeRequest{Key: []byte("zz")}, &pb.TxnRequest{}) {
				if res.err != nil || res.resp == nil {
					t.Fatalf("no-op request %d: %v", i, res.err)
				}
			}
			tc.restart(e)
			if e.s.Rev() != m.rev {
				t.Fatalf("revision after restart = %d, want %d", e.s.Rev(), m.rev)
			}
			if e.s.CompactRev() != -1 {
				t.Errorf("compact revision after restart = %d, want -1", e.s.CompactRev())
			}
			checkAllRevisions(t, e, m, "after restart")
			for _, k := range keys {
				for rev := int64(1); rev <= m.rev; rev++ {
					if got, want := e.get(k, rev), m.at(k, rev); !proto.Equal(got, want) {
						t.Fatalf("%q at %d after restart:%s", k, rev, protoDiff(got, want))
					}
				}
			}
			// Writes continue from the restored revision, versions from the restored keys.
			randomHistory(t, e, m, rng, keys, 20)
			tc.restart(e)
			checkAllRevisions(t, e, m, "after the second restart")
			checkKeyspace(t, e, m, "after the second restart")
		})
	}
}

// A store reopened on a database written by several batches of many requests each.
func TestRestartAfterMultiRequestBatches(t *testing.T) {
	e := newEnv(t)
	m := newModel(leaseSet{})
	reqs := []proto.Message{
		&pb.PutRequest{Key: []byte("a"), Value: []byte("1")},
		&pb.PutRequest{Key: []byte("b"), Value: []byte("1")},
		&pb.TxnRequest{Success: []*pb.RequestOp{putOp("a", "2"), delOp("b", "")}},
		&pb.DeleteRangeRequest{Key: []byte("missing")},
		&pb.PutRequest{Key: []byte("b"), Value: []byte("2"), PrevKv: true},
	}
	for round := 0; round < 3; round++ {
		for i, res := range e.applyBatch(reqs...) {
			want, wantErr := m.apply(reqs[i])
			if res.err != nil || wantErr != nil || !proto.Equal(res.resp, want) {
				t.Fatalf("round %d request %d: err %v (model %v)%s", round, i, res.err, wantErr, protoDiff(res.resp, want))
			}
		}
	}
	e.restart()
	if e.s.Rev() != m.rev || m.rev != 13 {
		t.Fatalf("revision after restart %d, model %d, want 13", e.s.Rev(), m.rev)
	}
	checkAllRevisions(t, e, m, "after restart")
}
