package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// diffOps is the length of the random operation sequence.
const diffOps = 300

// TestDifferential applies the same random sequence of KV requests to the
// target (kvmesh, or etcd for KVMESH_E2E_TARGET=etcd) and to a reference
// etcd, both fresh, and requires identical results: the same error (gRPC code
// and message) or the same response once header cluster_id, member_id and
// raft_term are zeroed (they legitimately differ); revisions must match.
//
// The requests are built as etcdserverpb messages and sent with the KV stub
// over clientv3's connection, so that exactly the same wire request reaches
// both servers. Set KVMESH_E2E_SEED to replay a sequence.
func TestDifferential(t *testing.T) {
	t.Parallel() // own servers only; never touches the shared one
	kind := harness.MustTarget(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("KVMESH_E2E_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("KVMESH_E2E_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("differential seed %d (replay with KVMESH_E2E_SEED=%d)", seed, seed)

	target := harness.Start(t, kind, harness.Options{Name: "diff-target"})
	oracle := harness.StartEtcd(t, harness.Options{Name: "diff-oracle"})
	tName, oName := string(kind), "etcd(oracle)"
	tKV := pb.NewKVClient(etcdclient.NewClient(t, target).ActiveConnection())
	oKV := pb.NewKVClient(etcdclient.NewClient(t, oracle).ActiveConnection())

	g := &diffGen{rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), rev: 1}
	var history []string
	prevText := "(none)"
	stats := map[string]int{}
	for i := 0; i < diffOps; i++ {
		op := g.next()
		history = append(history, fmt.Sprintf("#%d %s", i, op.desc))
		rt, et := op.run(t, tKV)
		ro, eo := op.run(t, oKV)
		if msg := compareResults(tName, oName, rt, et, ro, eo); msg != "" {
			from := max(0, len(history)-15)
			for _, s := range []struct {
				name string
				srv  *harness.Server
			}{{tName, target}, {oName, oracle}} {
				if !s.srv.Running() {
					msg += fmt.Sprintf("\n\n%s is no longer running (crashed?); the request before this one was:\n%s", s.name, prevText)
				}
			}
			t.Fatalf("op #%d differs (seed %d, replay with KVMESH_E2E_SEED=%d):\n%s\n\nrequest:\n%s\n\nlast ops:\n%s",
				i, seed, seed, msg, op.text, strings.Join(history[from:], "\n"))
		}
		prevText = op.text
		kindOf, _, _ := strings.Cut(op.desc, " ")
		if eo != nil {
			stats[kindOf+" -> "+errDesc(eo)]++
		} else {
			stats[kindOf+" -> ok"]++
		}
		if eo == nil {
			if h := headerOfMsg(ro); h != nil && h.Revision > g.rev {
				g.rev = h.Revision
			}
			if op.compactRev > 0 {
				g.compacted = op.compactRev
			}
		}
	}
	// Finally the whole key space must be identical.
	all := &pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0}}
	rt, et := tKV.Range(ctxT(t), all)
	ro, eo := oKV.Range(ctxT(t), all)
	if et != nil || eo != nil {
		t.Fatalf("final range of the whole key space failed (seed %d): %s: %s; %s: %s", seed, tName, errDesc(et), oName, errDesc(eo))
	}
	if msg := compareResults(tName, oName, rt, et, ro, eo); msg != "" {
		t.Fatalf("final state differs (seed %d):\n%s", seed, msg)
	}
	t.Logf("%d ops identical; final revision %d, compacted at %d, %d keys", diffOps, g.rev, g.compacted, ro.Count)
	var lines []string
	for k, v := range stats {
		lines = append(lines, fmt.Sprintf("%4d  %s", v, k))
	}
	sort.Strings(lines)
	t.Logf("outcomes:\n%s", strings.Join(lines, "\n"))
}

// diffOp is one generated request.
type diffOp struct {
	desc       string // one-line summary
	text       string // the request in prototext
	compactRev int64  // set for a compaction
	call       func(ctx context.Context, kv pb.KVClient) (proto.Message, error)
}

func (o diffOp) run(t *testing.T, kv pb.KVClient) (proto.Message, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return o.call(ctx, kv)
}

// diffGen generates random requests over a small key space.
type diffGen struct {
	rng       *rand.Rand
	rev       int64 // current revision, as last reported
	compacted int64 // last compaction revision
	// physical makes every compaction wait until it is done: what a watch from the
	// compacted revision sees of the tombstones there is decided only then in etcd.
	physical bool
}

var diffKeys = []string{"a", "a/1", "a/2", "b", "b/1", "c", "d", "e", "f", "g", "h"}

func (g *diffGen) pct(p int) bool { return g.rng.IntN(100) < p }

func (g *diffGen) key() []byte { return []byte(diffKeys[g.rng.IntN(len(diffKeys))]) }

func (g *diffGen) value() []byte {
	if g.pct(5) {
		return nil
	}
	return []byte(fmt.Sprintf("v%d", g.rng.IntN(8)))
}

// keyRange returns a key and range end: single key, [k1,k2), prefix or
// from-key.
func (g *diffGen) keyRange() (key, end []byte) {
	switch n := g.rng.IntN(10); {
	case n < 5:
		return g.key(), nil
	case n < 7:
		a, b := g.key(), g.key()
		if string(a) > string(b) && g.pct(80) {
			a, b = b, a
		}
		return a, b
	case n < 9:
		p := []string{"a", "a/", "b", "c", "z"}[g.rng.IntN(5)]
		return []byte(p), prefixEnd([]byte(p))
	default:
		return g.key(), []byte{0}
	}
}

func prefixEnd(p []byte) []byte {
	end := append([]byte(nil), p...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return []byte{0}
}

// revision picks a read revision: mostly latest, sometimes past, compacted
// or future.
func (g *diffGen) revision() int64 {
	if g.pct(50) {
		return 0
	}
	lo := max(1, g.compacted-2)
	hi := g.rev + 2
	return lo + g.rng.Int64N(hi-lo+1)
}

func (g *diffGen) rangeReq() *pb.RangeRequest {
	k, e := g.keyRange()
	r := &pb.RangeRequest{Key: k, RangeEnd: e, Revision: g.revision()}
	if g.pct(30) {
		r.Limit = g.rng.Int64N(5)
	}
	if g.pct(35) {
		r.SortTarget = pb.RangeRequest_SortTarget(g.rng.IntN(5))
		r.SortOrder = pb.RangeRequest_SortOrder(g.rng.IntN(3))
	}
	if g.pct(15) {
		r.KeysOnly = true
	}
	if g.pct(10) {
		r.CountOnly = true
	}
	// A mesh serves serializable reads on any replica, which may lag the leader (as an
	// etcd follower does): against a single-node oracle, only linearizable reads compare.
	if g.pct(20) && harness.Topology() != harness.TopologyMesh {
		r.Serializable = true
	}
	if g.pct(10) {
		r.MinModRevision = g.rng.Int64N(g.rev + 1)
	}
	if g.pct(10) {
		r.MaxModRevision = g.rng.Int64N(g.rev + 1)
	}
	if g.pct(10) {
		r.MinCreateRevision = g.rng.Int64N(g.rev + 1)
	}
	if g.pct(10) {
		r.MaxCreateRevision = g.rng.Int64N(g.rev + 1)
	}
	return r
}

func (g *diffGen) putReq() *pb.PutRequest {
	r := &pb.PutRequest{Key: g.key(), Value: g.value(), PrevKv: g.pct(30)}
	switch n := g.rng.IntN(100); {
	case n < 6:
		r.IgnoreValue, r.Value = true, nil
	case n < 8:
		r.IgnoreValue = true // with a value: "value is provided" unless empty
	case n < 13:
		r.IgnoreLease = true
	case n < 15:
		r.Lease = 0x7e57_0000_0000_0000 + g.rng.Int64N(100) // no such lease
	}
	return r
}

func (g *diffGen) deleteReq() *pb.DeleteRangeRequest {
	k, e := g.key(), []byte(nil)
	if g.pct(35) {
		k, e = g.keyRange()
	}
	return &pb.DeleteRangeRequest{Key: k, RangeEnd: e, PrevKv: g.pct(40)}
}

func (g *diffGen) compare() *pb.Compare {
	c := &pb.Compare{
		Key:    g.key(),
		Result: pb.Compare_CompareResult(g.rng.IntN(4)),
		Target: pb.Compare_CompareTarget(g.rng.IntN(5)),
	}
	if g.pct(20) {
		_, c.RangeEnd = g.keyRange()
		if c.RangeEnd == nil {
			c.RangeEnd = prefixEnd(c.Key)
		}
	}
	switch c.Target {
	case pb.Compare_VERSION:
		c.TargetUnion = &pb.Compare_Version{Version: g.rng.Int64N(5)}
	case pb.Compare_CREATE:
		c.TargetUnion = &pb.Compare_CreateRevision{CreateRevision: g.rng.Int64N(g.rev + 2)}
	case pb.Compare_MOD:
		c.TargetUnion = &pb.Compare_ModRevision{ModRevision: g.rng.Int64N(g.rev + 2)}
	case pb.Compare_VALUE:
		c.TargetUnion = &pb.Compare_Value{Value: g.value()}
	case pb.Compare_LEASE:
		c.TargetUnion = &pb.Compare_Lease{Lease: 0}
	}
	return c
}

func (g *diffGen) txnReq(depth int) *pb.TxnRequest {
	r := &pb.TxnRequest{}
	for range g.rng.IntN(4) {
		r.Compare = append(r.Compare, g.compare())
	}
	ops := func() []*pb.RequestOp {
		var out []*pb.RequestOp
		for range g.rng.IntN(5) {
			switch n := g.rng.IntN(10); {
			case n < 4:
				out = append(out, &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: g.putReq()}})
			case n < 6:
				out = append(out, &pb.RequestOp{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: g.deleteReq()}})
			case n < 9 || depth >= 2:
				out = append(out, &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: g.rangeReq()}})
			default:
				out = append(out, &pb.RequestOp{Request: &pb.RequestOp_RequestTxn{RequestTxn: g.txnReq(depth + 1)}})
			}
		}
		return out
	}
	r.Success, r.Failure = ops(), ops()
	return r
}

func (g *diffGen) next() diffOp {
	var m proto.Message
	var op diffOp
	switch n := g.rng.IntN(100); {
	case n < 30:
		r := g.putReq()
		if g.pct(2) {
			r.Key = nil
		}
		m, op.desc = r, fmt.Sprintf("Put %q=%q", r.Key, r.Value)
		op.call = func(ctx context.Context, kv pb.KVClient) (proto.Message, error) { return kv.Put(ctx, r) }
	case n < 42:
		r := g.deleteReq()
		m, op.desc = r, fmt.Sprintf("DeleteRange [%q,%q)", r.Key, r.RangeEnd)
		op.call = func(ctx context.Context, kv pb.KVClient) (proto.Message, error) { return kv.DeleteRange(ctx, r) }
	case n < 62:
		r := g.txnReq(0)
		avoidFromKeyDelete(r)
		avoidCheckOrderDifference(r, g.pct(50))
		m, op.desc = r, fmt.Sprintf("Txn (%d compares, %d/%d ops)", len(r.Compare), len(r.Success), len(r.Failure))
		op.call = func(ctx context.Context, kv pb.KVClient) (proto.Message, error) { return kv.Txn(ctx, r) }
	case n < 97:
		r := g.rangeReq()
		m, op.desc = r, fmt.Sprintf("Range [%q,%q) rev %d", r.Key, r.RangeEnd, r.Revision)
		op.call = func(ctx context.Context, kv pb.KVClient) (proto.Message, error) { return kv.Range(ctx, r) }
	default:
		lo := max(1, g.compacted-1)
		r := &pb.CompactionRequest{Revision: lo + g.rng.Int64N(g.rev+2-lo), Physical: g.pct(50) || g.physical}
		m, op.desc, op.compactRev = r, fmt.Sprintf("Compact %d physical=%v", r.Revision, r.Physical), r.Revision
		op.call = func(ctx context.Context, kv pb.KVClient) (proto.Message, error) { return kv.Compact(ctx, r) }
	}
	op.text = fmt.Sprintf("%T %s", m, prototext.MarshalOptions{Multiline: true}.Format(m))
	return op
}

// avoidFromKeyDelete keeps txns away from an etcd bug (in 3.4, and the
// 3.7 code has the same shape): the txn duplicate-key check builds the
// interval [key, "\x00") for a from-key delete, which is empty, so a put
// later in the same txn to a key that delete removed is not refused. etcd
// then either panics while applying ("unexpected error during txn", when the
// put has ignore_value or ignore_lease) or writes the key twice in one
// revision, which etcd 3.7.3 later fails to read after a compaction (fatal
// "range failed to find revision pair"). Neither is behaviour to compare, so
// in a txn that also puts, from-key deletes become deletes up to "\xff"
// (the same keys here, and the duplicate check sees them).
func avoidFromKeyDelete(r *pb.TxnRequest) {
	puts := false
	forEachOp(r, func(op *pb.RequestOp) {
		if op.GetRequestPut() != nil {
			puts = true
		}
	})
	if !puts {
		return
	}
	forEachOp(r, func(op *pb.RequestOp) {
		if d := op.GetRequestDeleteRange(); d != nil && string(d.RangeEnd) == "\x00" {
			d.RangeEnd = []byte{0xff}
		}
	})
}

// forEachOp calls f for every op of r and of its nested txns.
func forEachOp(r *pb.TxnRequest, f func(*pb.RequestOp)) {
	for _, op := range append(append([]*pb.RequestOp(nil), r.Success...), r.Failure...) {
		f(op)
		if t := op.GetRequestTxn(); t != nil {
			forEachOp(t, f)
		}
	}
}

// avoidCheckOrderDifference keeps txns away from a point where etcd 3.4 and
// 3.6/3.7 differ: when the ops of the taken path hold both a range that fails
// (compacted or future revision) and a put that fails (ignore_value or
// ignore_lease on a missing key, unknown lease), etcd 3.4 reports the put's
// error (it checks all puts before all ranges) while 3.6/3.7 report the first
// failing op in order. kvmesh follows 3.6/3.7, the oracle here is 3.4, so a
// txn keeps either its failable ranges or its failable puts.
func avoidCheckOrderDifference(r *pb.TxnRequest, keepPuts bool) {
	failablePuts, failableRanges := false, false
	forEachOp(r, func(op *pb.RequestOp) {
		if p := op.GetRequestPut(); p != nil && (p.IgnoreValue || p.IgnoreLease || p.Lease != 0) {
			failablePuts = true
		}
		if rr := op.GetRequestRange(); rr != nil && rr.Revision != 0 {
			failableRanges = true
		}
	})
	if !failablePuts || !failableRanges {
		return
	}
	forEachOp(r, func(op *pb.RequestOp) {
		if keepPuts {
			if rr := op.GetRequestRange(); rr != nil {
				rr.Revision = 0
			}
		} else if p := op.GetRequestPut(); p != nil {
			p.IgnoreValue, p.IgnoreLease, p.Lease = false, false, 0
		}
	})
}

// headerOfMsg returns the top-level header of a KV response.
func headerOfMsg(m proto.Message) *pb.ResponseHeader {
	if h, ok := m.(interface{ GetHeader() *pb.ResponseHeader }); ok {
		return h.GetHeader()
	}
	return nil
}

// normalize zeroes the header fields that legitimately differ between two
// clusters (cluster_id, member_id, raft_term), in nested txn responses too.
func normalize(m proto.Message) proto.Message {
	if m == nil {
		return nil
	}
	m = proto.Clone(m)
	var walk func(m proto.Message)
	zero := func(h *pb.ResponseHeader) {
		if h != nil {
			h.ClusterId, h.MemberId, h.RaftTerm = 0, 0, 0
		}
	}
	walk = func(m proto.Message) {
		zero(headerOfMsg(m))
		if txn, ok := m.(*pb.TxnResponse); ok {
			for _, r := range txn.Responses {
				switch v := r.Response.(type) {
				case *pb.ResponseOp_ResponseRange:
					walk(v.ResponseRange)
				case *pb.ResponseOp_ResponsePut:
					walk(v.ResponsePut)
				case *pb.ResponseOp_ResponseDeleteRange:
					walk(v.ResponseDeleteRange)
				case *pb.ResponseOp_ResponseTxn:
					walk(v.ResponseTxn)
				}
			}
		}
	}
	walk(m)
	return m
}

// isNilMsg tells whether m is a nil interface or a typed nil pointer.
func isNilMsg(m proto.Message) bool {
	return m == nil || !m.ProtoReflect().IsValid()
}

// compareResults returns "" when both outcomes are the same, or a readable
// explanation with a line diff.
func compareResults(aName, bName string, ra proto.Message, ea error, rb proto.Message, eb error) string {
	if ea != nil || eb != nil {
		if errDesc(ea) == errDesc(eb) {
			return ""
		}
		return fmt.Sprintf("errors differ:\n  %-14s %s\n  %-14s %s", aName+":", errDesc(ea), bName+":", errDesc(eb))
	}
	if isNilMsg(ra) || isNilMsg(rb) {
		return fmt.Sprintf("nil response: %s=%v %s=%v", aName, ra, bName, rb)
	}
	na, nb := normalize(ra), normalize(rb)
	if proto.Equal(na, nb) {
		return ""
	}
	opts := prototext.MarshalOptions{Multiline: true, Indent: "  "}
	ta, tb := opts.Format(na), opts.Format(nb)
	return fmt.Sprintf("responses differ (headers' cluster_id/member_id/raft_term zeroed; - %s, + %s):\n%s",
		bName, aName, lineDiff(tb, ta))
}

// lineDiff renders a unified-style line diff from a to b (LCS based; the
// texts are small).
func lineDiff(a, b string) string {
	x := strings.Split(strings.TrimRight(a, "\n"), "\n")
	y := strings.Split(strings.TrimRight(b, "\n"), "\n")
	n, m := len(x), len(y)
	lcs := make([][]int, n+1)
	for i := range lcs {
		lcs[i] = make([]int, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if x[i] == y[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var out strings.Builder
	i, j := 0, 0
	for i < n || j < m {
		switch {
		case i < n && j < m && x[i] == y[j]:
			out.WriteString("  " + x[i] + "\n")
			i++
			j++
		case i < n && (j == m || lcs[i+1][j] >= lcs[i][j+1]):
			out.WriteString("- " + x[i] + "\n")
			i++
		default:
			out.WriteString("+ " + y[j] + "\n")
			j++
		}
	}
	return out.String()
}
