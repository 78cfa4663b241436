package e2e

import (
	"fmt"
	"sort"
	"strings"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// TestKVFreshStoreRevision starts its own server: an empty store is at
// revision 1, and the first write makes revision 2.
func TestKVFreshStoreRevision(t *testing.T) {
	t.Parallel() // own servers only; never touches the shared one
	s := harness.StartTarget(t, harness.Options{Name: "fresh"})
	cli := etcdclient.NewClient(t, s)

	get := mustGet(t, cli, "foo")
	checkHeader(t, "Get on an empty store", get.Header, 1)
	if get.Count != 0 || len(get.Kvs) != 0 || get.More {
		t.Fatalf("Get on an empty store: count=%d kvs=%s more=%v, want nothing", get.Count, fmtKVs(get.Kvs), get.More)
	}
	all := mustGet(t, cli, "\x00", clientv3.WithFromKey())
	if all.Count != 0 {
		t.Fatalf("Get of the whole key space of an empty store: count=%d %s, want 0", all.Count, fmtKVs(all.Kvs))
	}
	at1 := mustGet(t, cli, "foo", clientv3.WithRev(1))
	checkHeader(t, "Get WithRev(1) on an empty store", at1.Header, 1)
	_, err := cli.Get(ctxT(t), "foo", clientv3.WithRev(2))
	requireEtcdErr(t, "Get WithRev(2) on an empty store", err, rpctypes.ErrFutureRev)

	del := mustDelete(t, cli, "foo")
	checkHeader(t, "Delete of a missing key on an empty store", del.Header, 1)
	if del.Deleted != 0 {
		t.Fatalf("Delete of a missing key: deleted=%d, want 0", del.Deleted)
	}

	put := mustPut(t, cli, "foo", "bar")
	checkHeader(t, "first Put", put.Header, 2)
	get = mustGet(t, cli, "foo")
	checkHeader(t, "Get after the first Put", get.Header, 2)
	if len(get.Kvs) != 1 {
		t.Fatalf("Get after the first Put: %s, want one key", fmtKVs(get.Kvs))
	}
	expectKV(t, "Get after the first Put", get.Kvs[0], "foo", "bar", 2, 2, 1)

	// A graceful restart keeps the data and the revision.
	s.Restart()
	cli2 := etcdclient.NewClient(t, s)
	get = mustGet(t, cli2, "foo")
	checkHeader(t, "Get after a graceful restart", get.Header, 2)
	if len(get.Kvs) != 1 {
		t.Fatalf("Get after a graceful restart: %s, want foo=bar", fmtKVs(get.Kvs))
	}
	expectKV(t, "Get after a graceful restart", get.Kvs[0], "foo", "bar", 2, 2, 1)
}

// TestKVRevisionAccounting checks which requests bump the revision: every
// write request (put, delete that deletes something, txn that changes
// something) adds exactly one; reads and writes that change nothing add none.
func TestKVRevisionAccounting(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	rev := currentRev(t, cli)

	type step struct {
		name  string
		do    func() (*pb.ResponseHeader, error)
		delta int64
	}
	hdr := func(f func() (*pb.ResponseHeader, error)) func() (*pb.ResponseHeader, error) { return f }
	steps := []step{
		{"put new key", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Put(ctxT(t), p+"a", "1")
			return headerOf(r, err)
		}), 1},
		{"get", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Get(ctxT(t), p+"a")
			return headerOf(r, err)
		}), 0},
		{"get prefix with count_only", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Get(ctxT(t), p, clientv3.WithPrefix(), clientv3.WithCountOnly())
			return headerOf(r, err)
		}), 0},
		{"serializable get", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Get(ctxT(t), p+"a", clientv3.WithSerializable())
			return headerOf(r, err)
		}), 0},
		{"overwrite same key with same value", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Put(ctxT(t), p+"a", "1")
			return headerOf(r, err)
		}), 1},
		{"delete missing key", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Delete(ctxT(t), p+"missing")
			return headerOf(r, err)
		}), 0},
		{"delete empty prefix", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Delete(ctxT(t), p+"nothing/", clientv3.WithPrefix())
			return headerOf(r, err)
		}), 0},
		{"delete existing key", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Delete(ctxT(t), p+"a")
			return headerOf(r, err)
		}), 1},
		{"txn with two puts", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"x", "1"), clientv3.OpPut(p+"y", "1")).Commit()
			return headerOf(r, err)
		}), 1},
		{"delete range of two keys", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Delete(ctxT(t), p+"x", clientv3.WithRange(p+"z"))
			return headerOf(r, err)
		}), 1},
		{"read-only txn", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Txn(ctxT(t)).Then(clientv3.OpGet(p+"x"), clientv3.OpGet(p, clientv3.WithPrefix())).Commit()
			return headerOf(r, err)
		}), 0},
		{"empty txn", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Txn(ctxT(t)).Commit()
			return headerOf(r, err)
		}), 0},
		{"txn whose compare fails and has no else ops", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Txn(ctxT(t)).If(clientv3.Compare(clientv3.Version(p+"x"), ">", 5)).Then(clientv3.OpPut(p+"x", "1")).Commit()
			return headerOf(r, err)
		}), 0},
		{"txn that only deletes missing keys", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Txn(ctxT(t)).Then(clientv3.OpDelete(p+"x"), clientv3.OpDelete(p+"q", clientv3.WithPrefix())).Commit()
			return headerOf(r, err)
		}), 0},
		{"txn with put, delete-nothing and get", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"b", "1"), clientv3.OpDelete(p+"nope"), clientv3.OpGet(p+"b")).Commit()
			return headerOf(r, err)
		}), 1},
		{"put with prev_kv", hdr(func() (*pb.ResponseHeader, error) {
			r, err := cli.Put(ctxT(t), p+"b", "2", clientv3.WithPrevKV())
			return headerOf(r, err)
		}), 1},
		{"failed put (ignore_value on missing key)", hdr(func() (*pb.ResponseHeader, error) {
			_, err := cli.Put(ctxT(t), p+"never", "", clientv3.WithIgnoreValue())
			if err == nil {
				return nil, fmt.Errorf("expected an error")
			}
			return nil, nil
		}), 0},
		{"failed txn (duplicate key)", hdr(func() (*pb.ResponseHeader, error) {
			_, err := cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"d", "1"), clientv3.OpPut(p+"d", "2")).Commit()
			if err == nil {
				return nil, fmt.Errorf("expected an error")
			}
			return nil, nil
		}), 0},
	}
	for _, st := range steps {
		h, err := st.do()
		if err != nil {
			t.Fatalf("step %q: %s", st.name, errDesc(err))
		}
		rev += st.delta
		if h != nil {
			checkHeader(t, "step "+st.name, h, rev)
		}
		if got := currentRev(t, cli); got != rev {
			t.Fatalf("after step %q the store is at revision %d, want %d (delta %d)", st.name, got, rev, st.delta)
		}
	}
}

// headerOf extracts the header of a clientv3 response (clientv3 response
// types are defined types without the protobuf getters).
func headerOf(r any, err error) (*pb.ResponseHeader, error) {
	if err != nil {
		return nil, err
	}
	switch r := r.(type) {
	case *clientv3.PutResponse:
		return r.Header, nil
	case *clientv3.GetResponse:
		return r.Header, nil
	case *clientv3.DeleteResponse:
		return r.Header, nil
	case *clientv3.TxnResponse:
		return r.Header, nil
	case *clientv3.CompactResponse:
		return r.Header, nil
	}
	return nil, fmt.Errorf("headerOf: unexpected response type %T", r)
}

// TestKVCreateModVersion checks create_revision, mod_revision and version
// through updates, deletion and re-creation, and reads at past revisions.
func TestKVCreateModVersion(t *testing.T) {
	cli := sharedClient(t)
	k := prefixFor(t) + "k"
	r0 := currentRev(t, cli)

	p1 := mustPut(t, cli, k, "v1")
	checkHeader(t, "put v1", p1.Header, r0+1)
	p2 := mustPut(t, cli, k, "v2")
	checkHeader(t, "put v2", p2.Header, r0+2)
	p3 := mustPut(t, cli, k, "v3")
	checkHeader(t, "put v3", p3.Header, r0+3)
	g := mustGet(t, cli, k)
	expectKV(t, "after three puts", g.Kvs[0], k, "v3", r0+1, r0+3, 3)

	d := mustDelete(t, cli, k, clientv3.WithPrevKV())
	checkHeader(t, "delete", d.Header, r0+4)
	if d.Deleted != 1 || len(d.PrevKvs) != 1 {
		t.Fatalf("delete: deleted=%d prev_kvs=%s, want 1 and the old key", d.Deleted, fmtKVs(d.PrevKvs))
	}
	expectKV(t, "delete prev_kv", d.PrevKvs[0], k, "v3", r0+1, r0+3, 3)
	if g := mustGet(t, cli, k); g.Count != 0 {
		t.Fatalf("get after delete: %s, want nothing", fmtKVs(g.Kvs))
	}

	p4 := mustPut(t, cli, k, "v4")
	checkHeader(t, "re-create", p4.Header, r0+5)
	g = mustGet(t, cli, k)
	expectKV(t, "after re-creation", g.Kvs[0], k, "v4", r0+5, r0+5, 1)

	// The history is readable at every revision.
	for _, c := range []struct {
		rev                  int64
		val                  string // "" = key absent
		create, mod, version int64
	}{
		{r0, "", 0, 0, 0},
		{r0 + 1, "v1", r0 + 1, r0 + 1, 1},
		{r0 + 2, "v2", r0 + 1, r0 + 2, 2},
		{r0 + 3, "v3", r0 + 1, r0 + 3, 3},
		{r0 + 4, "", 0, 0, 0},
		{r0 + 5, "v4", r0 + 5, r0 + 5, 1},
	} {
		g := mustGet(t, cli, k, clientv3.WithRev(c.rev))
		what := fmt.Sprintf("get at revision %d", c.rev)
		// The header carries the current revision, not the requested one.
		checkHeader(t, what, g.Header, r0+5)
		if c.val == "" {
			if g.Count != 0 || len(g.Kvs) != 0 {
				t.Fatalf("%s: %s, want no key", what, fmtKVs(g.Kvs))
			}
			continue
		}
		if g.Count != 1 || len(g.Kvs) != 1 {
			t.Fatalf("%s: count=%d %s, want one key", what, g.Count, fmtKVs(g.Kvs))
		}
		expectKV(t, what, g.Kvs[0], k, c.val, c.create, c.mod, c.version)
	}

	// Future revisions are refused.
	for _, fut := range []int64{r0 + 6, r0 + 1000} {
		_, err := cli.Get(ctxT(t), k, clientv3.WithRev(fut))
		requireEtcdErr(t, fmt.Sprintf("get at future revision %d", fut), err, rpctypes.ErrFutureRev)
	}
}

// rangeCase is one Range request and its expected outcome.
type rangeCase struct {
	name      string
	key       string // relative to the test prefix unless abs
	abs       bool
	opts      []clientv3.OpOption
	wantKeys  []string // relative to the prefix, in order
	wantCount int64
	wantMore  bool
	noValues  bool // keys_only: values must be empty
	countOnly bool // count_only: no kvs at all
}

func runRangeCases(t *testing.T, cli *clientv3.Client, p string, wantRev int64, vals map[string]string, cases []rangeCase) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			key := p + c.key
			if c.abs {
				key = c.key
			}
			g, err := cli.Get(ctxT(t), key, c.opts...)
			requireOK(t, "Get", err)
			checkHeader(t, "Get", g.Header, wantRev)
			if g.Count != c.wantCount || g.More != c.wantMore {
				t.Errorf("count=%d more=%v, want count=%d more=%v", g.Count, g.More, c.wantCount, c.wantMore)
			}
			if c.countOnly {
				if len(g.Kvs) != 0 {
					t.Errorf("count_only returned kvs %s", fmtKVs(g.Kvs))
				}
				return
			}
			if got := keysOf(g.Kvs, p); !equalStrings(got, c.wantKeys) {
				t.Errorf("keys %q, want %q", got, c.wantKeys)
			}
			for _, kv := range g.Kvs {
				rel := strings.TrimPrefix(string(kv.Key), p)
				want := vals[rel]
				if c.noValues {
					want = ""
				}
				if string(kv.Value) != want {
					t.Errorf("key %q: value %q, want %q", rel, kv.Value, want)
				}
				if kv.Version < 1 || kv.CreateRevision < 1 || kv.ModRevision < kv.CreateRevision {
					t.Errorf("key %q: bad metadata %s", rel, fmtKVs([]*mvccpb.KeyValue{kv}))
				}
			}
		})
	}
}

// TestKVRange covers single keys, ranges, prefixes, limit/more/count,
// keys_only, count_only and serializable reads.
func TestKVRange(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	vals := map[string]string{"a": "va", "b": "vb", "b/1": "vb1", "b/2": "vb2", "c": "vc", "d": "vd", "e": "ve"}
	var names []string
	for k := range vals {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		mustPut(t, cli, p+k, vals[k])
	}
	rev := currentRev(t, cli)
	all := []string{"a", "b", "b/1", "b/2", "c", "d", "e"}

	runRangeCases(t, cli, p, rev, vals, []rangeCase{
		{name: "single key", key: "b", wantKeys: []string{"b"}, wantCount: 1},
		{name: "missing key", key: "zz", wantKeys: []string{}, wantCount: 0},
		{name: "range [b,d)", key: "b", opts: []clientv3.OpOption{clientv3.WithRange(p + "d")}, wantKeys: []string{"b", "b/1", "b/2", "c"}, wantCount: 4},
		{name: "range end equal to key", key: "b", opts: []clientv3.OpOption{clientv3.WithRange(p + "b")}, wantKeys: []string{}, wantCount: 0},
		{name: "range end before key", key: "d", opts: []clientv3.OpOption{clientv3.WithRange(p + "b")}, wantKeys: []string{}, wantCount: 0},
		{name: "prefix of the test", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix()}, wantKeys: all, wantCount: 7},
		{name: "prefix b", key: "b", opts: []clientv3.OpOption{clientv3.WithPrefix()}, wantKeys: []string{"b", "b/1", "b/2"}, wantCount: 3},
		{name: "prefix b/", key: "b/", opts: []clientv3.OpOption{clientv3.WithPrefix()}, wantKeys: []string{"b/1", "b/2"}, wantCount: 2},
		{name: "prefix without keys", key: "x", opts: []clientv3.OpOption{clientv3.WithPrefix()}, wantKeys: []string{}, wantCount: 0},
		{name: "limit 2 of 7", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithLimit(2)}, wantKeys: []string{"a", "b"}, wantCount: 7, wantMore: true},
		{name: "limit 6 of 7", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithLimit(6)}, wantKeys: all[:6], wantCount: 7, wantMore: true},
		{name: "limit 7 of 7", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithLimit(7)}, wantKeys: all, wantCount: 7},
		{name: "limit 100 of 7", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithLimit(100)}, wantKeys: all, wantCount: 7},
		{name: "limit 0 means no limit", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithLimit(0)}, wantKeys: all, wantCount: 7},
		{name: "limit 1 on a range", key: "c", opts: []clientv3.OpOption{clientv3.WithRange(p + "z"), clientv3.WithLimit(1)}, wantKeys: []string{"c"}, wantCount: 3, wantMore: true},
		{name: "keys_only", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithKeysOnly()}, wantKeys: all, wantCount: 7, noValues: true},
		{name: "keys_only single key", key: "c", opts: []clientv3.OpOption{clientv3.WithKeysOnly()}, wantKeys: []string{"c"}, wantCount: 1, noValues: true},
		{name: "keys_only with limit", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(3)}, wantKeys: all[:3], wantCount: 7, wantMore: true, noValues: true},
		{name: "count_only", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithCountOnly()}, wantCount: 7, countOnly: true},
		{name: "count_only single key", key: "a", opts: []clientv3.OpOption{clientv3.WithCountOnly()}, wantCount: 1, countOnly: true},
		{name: "count_only missing", key: "zz", opts: []clientv3.OpOption{clientv3.WithCountOnly()}, wantCount: 0, countOnly: true},
		{name: "count_only with limit", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithCountOnly(), clientv3.WithLimit(2)}, wantCount: 7, countOnly: true},
		{name: "serializable", key: "", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSerializable()}, wantKeys: all, wantCount: 7},
		{name: "serializable single key", key: "e", opts: []clientv3.OpOption{clientv3.WithSerializable()}, wantKeys: []string{"e"}, wantCount: 1},
	})
}

// TestKVRangeFromKey covers range_end "\x00" (all keys >= key). The keys
// live under "\xfe..." so no other test's keys sort after them.
func TestKVRangeFromKey(t *testing.T) {
	cli := sharedClient(t)
	p := "\xfe" + prefixFor(t)
	vals := map[string]string{"a": "1", "b": "2", "c": "3"}
	for _, k := range []string{"a", "b", "c"} {
		mustPut(t, cli, p+k, vals[k])
	}
	t.Cleanup(func() { _, _ = cli.Delete(ctxT(t), p, clientv3.WithPrefix()) })
	rev := currentRev(t, cli)
	runRangeCases(t, cli, p, rev, vals, []rangeCase{
		{name: "from a", key: "a", opts: []clientv3.OpOption{clientv3.WithFromKey()}, wantKeys: []string{"a", "b", "c"}, wantCount: 3},
		{name: "from b", key: "b", opts: []clientv3.OpOption{clientv3.WithFromKey()}, wantKeys: []string{"b", "c"}, wantCount: 2},
		{name: "from bb", key: "bb", opts: []clientv3.OpOption{clientv3.WithFromKey()}, wantKeys: []string{"c"}, wantCount: 1},
		{name: "from b limit 1", key: "b", opts: []clientv3.OpOption{clientv3.WithFromKey(), clientv3.WithLimit(1)}, wantKeys: []string{"b"}, wantCount: 2, wantMore: true},
		{name: "explicit range end \\x00", key: "b", opts: []clientv3.OpOption{clientv3.WithRange("\x00")}, wantKeys: []string{"b", "c"}, wantCount: 2},
		{name: "from b count_only", key: "b", opts: []clientv3.OpOption{clientv3.WithFromKey(), clientv3.WithCountOnly()}, wantCount: 2, countOnly: true},
	})
	// The whole key space (key "\x00", range_end "\x00") includes our keys.
	g := mustGet(t, cli, "\x00", clientv3.WithFromKey(), clientv3.WithCountOnly())
	if g.Count < 3 {
		t.Fatalf("count of the whole key space = %d, want >= 3", g.Count)
	}
}

// TestKVRangeSort covers every sort target and order, and a target without
// an order (which sorts ascending, except for KEY which keeps key order).
func TestKVRangeSort(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	// Creation order c, a, e, b, d; then updates. Final state:
	//   versions a6 b2 c3 d1 e5; mod order d a b c e; values c<e<a<d<b.
	// Every target gives a different order and there are no ties.
	writes := []struct{ k, v string }{
		{"c", "c1"}, {"a", "a1"}, {"e", "e1"}, {"b", "b1"}, {"d", "q"},
		{"e", "e2"}, {"e", "e3"}, {"a", "a2"}, {"a", "a3"}, {"a", "a4"},
		{"e", "e4"}, {"c", "c2"}, {"a", "a5"},
		{"a", "m"}, {"b", "z"}, {"c", "a"}, {"e", "f"},
	}
	for _, w := range writes {
		mustPut(t, cli, p+w.k, w.v)
	}
	rev := currentRev(t, cli)
	base := mustGet(t, cli, p, clientv3.WithPrefix())
	kvs := base.Kvs
	if len(kvs) != 5 {
		t.Fatalf("setup: got %s, want 5 keys", fmtKVs(kvs))
	}

	type tgt struct {
		name string
		t    clientv3.SortTarget
		less func(a, b *mvccpb.KeyValue) bool
	}
	targets := []tgt{
		{"KEY", clientv3.SortByKey, func(a, b *mvccpb.KeyValue) bool { return string(a.Key) < string(b.Key) }},
		{"VERSION", clientv3.SortByVersion, func(a, b *mvccpb.KeyValue) bool { return a.Version < b.Version }},
		{"CREATE", clientv3.SortByCreateRevision, func(a, b *mvccpb.KeyValue) bool { return a.CreateRevision < b.CreateRevision }},
		{"MOD", clientv3.SortByModRevision, func(a, b *mvccpb.KeyValue) bool { return a.ModRevision < b.ModRevision }},
		{"VALUE", clientv3.SortByValue, func(a, b *mvccpb.KeyValue) bool { return string(a.Value) < string(b.Value) }},
	}
	sorted := func(less func(a, b *mvccpb.KeyValue) bool, desc bool) []string {
		c := append([]*mvccpb.KeyValue(nil), kvs...)
		sort.SliceStable(c, func(i, j int) bool {
			if desc {
				return less(c[j], c[i])
			}
			return less(c[i], c[j])
		})
		return keysOf(c, p)
	}
	// Sanity: the fixture really gives distinct orders.
	seen := map[string]string{}
	for _, tg := range targets {
		o := strings.Join(sorted(tg.less, false), ",")
		if prev, dup := seen[o]; dup {
			t.Fatalf("fixture bug: targets %s and %s give the same order %s", prev, tg.name, o)
		}
		seen[o] = tg.name
	}

	var cases []rangeCase
	vals := map[string]string{}
	for _, kv := range kvs {
		vals[strings.TrimPrefix(string(kv.Key), p)] = string(kv.Value)
	}
	for _, tg := range targets {
		asc, desc := sorted(tg.less, false), sorted(tg.less, true)
		cases = append(cases,
			rangeCase{name: tg.name + "/ASCEND", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(tg.t, clientv3.SortAscend)}, wantKeys: asc, wantCount: 5},
			rangeCase{name: tg.name + "/DESCEND", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(tg.t, clientv3.SortDescend)}, wantKeys: desc, wantCount: 5},
			// A target without an order sorts ascending (for KEY: key order).
			rangeCase{name: tg.name + "/NONE", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(tg.t, clientv3.SortNone)}, wantKeys: asc, wantCount: 5},
			// The limit applies after sorting.
			rangeCase{name: tg.name + "/DESCEND/limit2", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(tg.t, clientv3.SortDescend), clientv3.WithLimit(2)}, wantKeys: desc[:2], wantCount: 5, wantMore: true},
			rangeCase{name: tg.name + "/ASCEND/limit5", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(tg.t, clientv3.SortAscend), clientv3.WithLimit(5)}, wantKeys: asc, wantCount: 5},
			rangeCase{name: tg.name + "/DESCEND/keys_only", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(tg.t, clientv3.SortDescend), clientv3.WithKeysOnly()}, wantKeys: desc, wantCount: 5, noValues: true},
		)
	}
	runRangeCases(t, cli, p, rev, vals, cases)

	// Ties keep key order in both directions. etcd uses sort.Sort, which is
	// not stable in general, but for fewer than 13 results Go's sort is an
	// insertion sort, which is; kvmesh must match (use a stable sort).
	tp := p + "ties/"
	for _, k := range []string{"x", "y", "z"} {
		mustPut(t, cli, tp+k, "same")
	}
	rev = currentRev(t, cli)
	runRangeCases(t, cli, tp, rev, map[string]string{"x": "same", "y": "same", "z": "same"}, []rangeCase{
		{name: "ties/VERSION/DESCEND", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByVersion, clientv3.SortDescend)}, wantKeys: []string{"x", "y", "z"}, wantCount: 3},
		{name: "ties/VALUE/ASCEND", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByValue, clientv3.SortAscend)}, wantKeys: []string{"x", "y", "z"}, wantCount: 3},
		{name: "ties/VALUE/DESCEND/limit2", opts: []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByValue, clientv3.SortDescend), clientv3.WithLimit(2)}, wantKeys: []string{"x", "y"}, wantCount: 3, wantMore: true},
	})
}

// TestKVRangeRevisionFilters covers min/max mod/create revision filters.
// count is the number of keys in the range before filtering; more tells
// whether the filtered result was cut by the limit.
func TestKVRangeRevisionFilters(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	r0 := currentRev(t, cli)
	// a created r0+1, b r0+2, c r0+3, d r0+4; then b modified at r0+5, a at r0+6.
	for _, k := range []string{"a", "b", "c", "d", "b", "a"} {
		mustPut(t, cli, p+k, "v"+k)
	}
	rev := r0 + 6
	vals := map[string]string{"a": "va", "b": "vb", "c": "vc", "d": "vd"}
	pre := func(o ...clientv3.OpOption) []clientv3.OpOption {
		return append([]clientv3.OpOption{clientv3.WithPrefix()}, o...)
	}
	runRangeCases(t, cli, p, rev, vals, []rangeCase{
		{name: "min_mod", opts: pre(clientv3.WithMinModRev(r0 + 4)), wantKeys: []string{"a", "b", "d"}, wantCount: 4},
		{name: "max_mod", opts: pre(clientv3.WithMaxModRev(r0 + 4)), wantKeys: []string{"c", "d"}, wantCount: 4},
		{name: "min_create", opts: pre(clientv3.WithMinCreateRev(r0 + 2)), wantKeys: []string{"b", "c", "d"}, wantCount: 4},
		{name: "max_create", opts: pre(clientv3.WithMaxCreateRev(r0 + 2)), wantKeys: []string{"a", "b"}, wantCount: 4},
		{name: "min_and_max_mod", opts: pre(clientv3.WithMinModRev(r0+3), clientv3.WithMaxModRev(r0+5)), wantKeys: []string{"b", "c", "d"}, wantCount: 4},
		{name: "create_window", opts: pre(clientv3.WithMinCreateRev(r0+2), clientv3.WithMaxCreateRev(r0+3)), wantKeys: []string{"b", "c"}, wantCount: 4},
		{name: "filters_exclude_all", opts: pre(clientv3.WithMinModRev(r0 + 100)), wantKeys: []string{}, wantCount: 4},
		{name: "min_mod_with_limit", opts: pre(clientv3.WithMinModRev(r0+4), clientv3.WithLimit(2)), wantKeys: []string{"a", "b"}, wantCount: 4, wantMore: true},
		{name: "min_mod_with_limit_exact", opts: pre(clientv3.WithMinModRev(r0+4), clientv3.WithLimit(3)), wantKeys: []string{"a", "b", "d"}, wantCount: 4},
		{name: "max_create_sorted_by_mod_desc", opts: pre(clientv3.WithMaxCreateRev(r0+3), clientv3.WithSort(clientv3.SortByModRevision, clientv3.SortDescend)), wantKeys: []string{"a", "b", "c"}, wantCount: 4},
		{name: "min_mod_single_key_filtered_out", key: "c", opts: []clientv3.OpOption{clientv3.WithMinModRev(r0 + 4)}, wantKeys: []string{}, wantCount: 1},
		{name: "min_mod_at_old_revision", opts: pre(clientv3.WithRev(r0+4), clientv3.WithMinModRev(r0+2)), wantKeys: []string{"b", "c", "d"}, wantCount: 4},
	})
}

// TestKVPut covers prev_kv, ignore_value, ignore_lease and lease errors.
func TestKVPut(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	r0 := currentRev(t, cli)

	// prev_kv on a missing key: no prev_kv.
	r := mustPut(t, cli, p+"k", "v1", clientv3.WithPrevKV())
	checkHeader(t, "put new with prev_kv", r.Header, r0+1)
	if r.PrevKv != nil {
		t.Fatalf("put of a new key with prev_kv returned prev_kv %s", fmtKVs([]*mvccpb.KeyValue{r.PrevKv}))
	}
	// Without prev_kv nothing is returned either.
	r = mustPut(t, cli, p+"k", "v2")
	if r.PrevKv != nil {
		t.Fatalf("put without prev_kv returned prev_kv")
	}
	r = mustPut(t, cli, p+"k", "v3", clientv3.WithPrevKV())
	checkHeader(t, "put existing with prev_kv", r.Header, r0+3)
	expectKV(t, "prev_kv", r.PrevKv, p+"k", "v2", r0+1, r0+2, 2)

	// ignore_value keeps the value, bumps version and mod_revision.
	r = mustPut(t, cli, p+"k", "", clientv3.WithIgnoreValue(), clientv3.WithPrevKV())
	checkHeader(t, "put ignore_value", r.Header, r0+4)
	expectKV(t, "put ignore_value prev_kv", r.PrevKv, p+"k", "v3", r0+1, r0+3, 3)
	g := mustGet(t, cli, p+"k")
	expectKV(t, "after ignore_value", g.Kvs[0], p+"k", "v3", r0+1, r0+4, 4)

	// Errors, none of which changes the revision.
	_, err := cli.Put(ctxT(t), p+"missing", "", clientv3.WithIgnoreValue())
	requireEtcdErr(t, "ignore_value on a missing key", err, rpctypes.ErrKeyNotFound)
	_, err = cli.Put(ctxT(t), p+"k", "x", clientv3.WithIgnoreValue())
	requireEtcdErr(t, "ignore_value with a value", err, rpctypes.ErrValueProvided)
	_, err = cli.Put(ctxT(t), p+"missing", "x", clientv3.WithIgnoreLease())
	requireEtcdErr(t, "ignore_lease on a missing key", err, rpctypes.ErrKeyNotFound)
	_, err = cli.Put(ctxT(t), p+"k", "x", clientv3.WithLease(0x7e57_0000_0000_0001))
	requireEtcdErr(t, "put with a lease that does not exist", err, rpctypes.ErrLeaseNotFound)
	if got := currentRev(t, cli); got != r0+4 {
		t.Fatalf("failed puts changed the revision: %d, want %d", got, r0+4)
	}
	if g := mustGet(t, cli, p+"missing"); g.Count != 0 {
		t.Fatalf("failed puts created a key: %s", fmtKVs(g.Kvs))
	}

	// Leases: attach, keep with ignore_lease, detach with a plain put.
	lease := grantLease(t, cli)
	r = mustPut(t, cli, p+"l", "v1", clientv3.WithLease(lease))
	checkHeader(t, "put with lease", r.Header, r0+5)
	g = mustGet(t, cli, p+"l")
	if g.Kvs[0].Lease != int64(lease) {
		t.Fatalf("key put with lease %x has lease %x", lease, g.Kvs[0].Lease)
	}
	r = mustPut(t, cli, p+"l", "v2", clientv3.WithIgnoreLease(), clientv3.WithPrevKV())
	checkHeader(t, "put ignore_lease", r.Header, r0+6)
	if r.PrevKv == nil || r.PrevKv.Lease != int64(lease) {
		t.Fatalf("ignore_lease prev_kv: %v, want lease %x", r.PrevKv, lease)
	}
	g = mustGet(t, cli, p+"l")
	if g.Kvs[0].Lease != int64(lease) || string(g.Kvs[0].Value) != "v2" {
		t.Fatalf("after ignore_lease: %s, want value v2 and lease %x", fmtKVs(g.Kvs), lease)
	}
	// ignore_value and ignore_lease together.
	mustPut(t, cli, p+"l", "", clientv3.WithIgnoreLease(), clientv3.WithIgnoreValue())
	g = mustGet(t, cli, p+"l")
	expectKV(t, "after ignore_value+ignore_lease", g.Kvs[0], p+"l", "v2", r0+5, r0+7, 3)
	if g.Kvs[0].Lease != int64(lease) {
		t.Fatalf("after ignore_value+ignore_lease: lease %x, want %x", g.Kvs[0].Lease, lease)
	}
	_, err = cli.Put(ctxT(t), p+"l", "x", clientv3.WithIgnoreLease(), clientv3.WithLease(lease))
	requireEtcdErr(t, "ignore_lease with a lease", err, rpctypes.ErrLeaseProvided)
	// A plain put detaches the lease.
	mustPut(t, cli, p+"l", "v3")
	g = mustGet(t, cli, p+"l")
	if g.Kvs[0].Lease != 0 {
		t.Fatalf("plain put kept lease %x", g.Kvs[0].Lease)
	}
	if got := currentRev(t, cli); got != r0+8 {
		t.Fatalf("revision %d after the lease puts, want %d", got, r0+8)
	}
}

// TestKVDeleteRange covers deleted counts, prev_kv and ranges.
func TestKVDeleteRange(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	for _, k := range []string{"a", "b", "b/1", "b/2", "c", "d"} {
		mustPut(t, cli, p+k, "v"+k)
	}
	r0 := currentRev(t, cli)

	d := mustDelete(t, cli, p+"zz", clientv3.WithPrevKV())
	checkHeader(t, "delete missing", d.Header, r0)
	if d.Deleted != 0 || len(d.PrevKvs) != 0 {
		t.Fatalf("delete missing: deleted=%d prev=%s", d.Deleted, fmtKVs(d.PrevKvs))
	}
	d = mustDelete(t, cli, p+"a")
	checkHeader(t, "delete a", d.Header, r0+1)
	if d.Deleted != 1 || len(d.PrevKvs) != 0 {
		t.Fatalf("delete a without prev_kv: deleted=%d prev=%s, want 1 and no prev_kvs", d.Deleted, fmtKVs(d.PrevKvs))
	}
	d = mustDelete(t, cli, p+"b/", clientv3.WithPrefix(), clientv3.WithPrevKV())
	checkHeader(t, "delete prefix b/", d.Header, r0+2)
	if d.Deleted != 2 || !equalStrings(keysOf(d.PrevKvs, p), []string{"b/1", "b/2"}) {
		t.Fatalf("delete prefix b/: deleted=%d prev=%s, want b/1 and b/2", d.Deleted, fmtKVs(d.PrevKvs))
	}
	if string(d.PrevKvs[0].Value) != "vb/1" {
		t.Fatalf("delete prefix b/: prev value %q, want %q", d.PrevKvs[0].Value, "vb/1")
	}
	d = mustDelete(t, cli, p+"b", clientv3.WithRange(p+"d"), clientv3.WithPrevKV())
	checkHeader(t, "delete [b,d)", d.Header, r0+3)
	if d.Deleted != 2 || !equalStrings(keysOf(d.PrevKvs, p), []string{"b", "c"}) {
		t.Fatalf("delete [b,d): deleted=%d prev=%s, want b and c", d.Deleted, fmtKVs(d.PrevKvs))
	}
	g := mustGet(t, cli, p, clientv3.WithPrefix())
	if !equalStrings(keysOf(g.Kvs, p), []string{"d"}) {
		t.Fatalf("after deletes: keys %q, want [d]", keysOf(g.Kvs, p))
	}
	// The deleted keys are still visible at older revisions.
	g = mustGet(t, cli, p, clientv3.WithPrefix(), clientv3.WithRev(r0))
	if g.Count != 6 {
		t.Fatalf("get at revision %d before the deletes: count %d, want 6", r0, g.Count)
	}
	d = mustDelete(t, cli, p, clientv3.WithPrefix())
	checkHeader(t, "delete the rest", d.Header, r0+4)
	if d.Deleted != 1 {
		t.Fatalf("delete the rest: deleted=%d, want 1", d.Deleted)
	}
}

// txnCase is one compare evaluated in a txn.
type txnCase struct {
	name string
	cmps []clientv3.Cmp
	want bool
}

// TestKVTxnCompare covers compare targets, operators, missing keys and
// compares over ranges.
func TestKVTxnCompare(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	lease := grantLease(t, cli)
	leaseOpts := []clientv3.OpOption{clientv3.WithLease(lease)}

	k, k2, m := p+"k", p+"k2", p+"missing"
	c := mustPut(t, cli, k, "v1").Header.Revision
	mod := mustPut(t, cli, k, "v2", leaseOpts...).Header.Revision
	mustPut(t, cli, k2, "x")
	mustPut(t, cli, p+"r/a", "1")
	mustPut(t, cli, p+"r/b", "2")
	mustPut(t, cli, p+"r/b", "2")
	L := int64(lease)
	cmp := clientv3.Compare
	V, C, M, Val, Ls := clientv3.Version, clientv3.CreateRevision, clientv3.ModRevision, clientv3.Value, clientv3.LeaseValue

	cases := []txnCase{
		{"version =", []clientv3.Cmp{cmp(V(k), "=", 2)}, true},
		{"version = wrong", []clientv3.Cmp{cmp(V(k), "=", 1)}, false},
		{"version !=", []clientv3.Cmp{cmp(V(k), "!=", 1)}, true},
		{"version != same", []clientv3.Cmp{cmp(V(k), "!=", 2)}, false},
		{"version >", []clientv3.Cmp{cmp(V(k), ">", 1)}, true},
		{"version > equal", []clientv3.Cmp{cmp(V(k), ">", 2)}, false},
		{"version <", []clientv3.Cmp{cmp(V(k), "<", 3)}, true},
		{"version < equal", []clientv3.Cmp{cmp(V(k), "<", 2)}, false},
		{"create =", []clientv3.Cmp{cmp(C(k), "=", c)}, true},
		{"create !=", []clientv3.Cmp{cmp(C(k), "!=", c)}, false},
		{"create >", []clientv3.Cmp{cmp(C(k), ">", c-1)}, true},
		{"create < ", []clientv3.Cmp{cmp(C(k), "<", c)}, false},
		{"mod =", []clientv3.Cmp{cmp(M(k), "=", mod)}, true},
		{"mod = create", []clientv3.Cmp{cmp(M(k), "=", c)}, false},
		{"mod >", []clientv3.Cmp{cmp(M(k), ">", c)}, true},
		{"mod <", []clientv3.Cmp{cmp(M(k), "<", mod+1)}, true},
		{"mod !=", []clientv3.Cmp{cmp(M(k), "!=", mod)}, false},
		{"value =", []clientv3.Cmp{cmp(Val(k), "=", "v2")}, true},
		{"value = wrong", []clientv3.Cmp{cmp(Val(k), "=", "v1")}, false},
		{"value !=", []clientv3.Cmp{cmp(Val(k), "!=", "v1")}, true},
		{"value >", []clientv3.Cmp{cmp(Val(k), ">", "v1")}, true},
		{"value > longer", []clientv3.Cmp{cmp(Val(k), ">", "v2a")}, false},
		{"value <", []clientv3.Cmp{cmp(Val(k), "<", "v3")}, true},
		{"value < prefix", []clientv3.Cmp{cmp(Val(k), "<", "v")}, false},
		{"value = empty", []clientv3.Cmp{cmp(Val(k), "=", "")}, false},
		{"lease = 0 without lease", []clientv3.Cmp{cmp(Ls(k2), "=", 0)}, true},
		// A missing key compares as version/create/mod/lease 0; a value
		// compare on a missing key always fails.
		{"missing version = 0", []clientv3.Cmp{cmp(V(m), "=", 0)}, true},
		{"missing create = 0", []clientv3.Cmp{cmp(C(m), "=", 0)}, true},
		{"missing mod < 1", []clientv3.Cmp{cmp(M(m), "<", 1)}, true},
		{"missing version > 0", []clientv3.Cmp{cmp(V(m), ">", 0)}, false},
		{"missing lease = 0", []clientv3.Cmp{cmp(Ls(m), "=", 0)}, true},
		{"missing value = empty", []clientv3.Cmp{cmp(Val(m), "=", "")}, false},
		{"missing value != x", []clientv3.Cmp{cmp(Val(m), "!=", "x")}, false},
		{"missing value > empty", []clientv3.Cmp{cmp(Val(m), ">", "")}, false},
		// Compares over a range must hold for every key in it.
		{"prefix version > 0", []clientv3.Cmp{cmp(V(p+"r/"), ">", 0).WithPrefix()}, true},
		{"prefix version = 1", []clientv3.Cmp{cmp(V(p+"r/"), "=", 1).WithPrefix()}, false},
		{"prefix version < 3", []clientv3.Cmp{cmp(V(p+"r/"), "<", 3).WithPrefix()}, true},
		{"range value != 3", []clientv3.Cmp{cmp(Val(p+"r/a"), "!=", "3").WithRange(p + "r/c")}, true},
		{"range value = 1", []clientv3.Cmp{cmp(Val(p+"r/a"), "=", "1").WithRange(p + "r/c")}, false},
		{"range value = 1 narrowed", []clientv3.Cmp{cmp(Val(p+"r/a"), "=", "1").WithRange(p + "r/b")}, true},
		{"range create > base", []clientv3.Cmp{cmp(C(p+"r/a"), ">", mod).WithRange(p + "r/z")}, true},
		{"empty range version = 0", []clientv3.Cmp{cmp(V(p+"none/"), "=", 0).WithPrefix()}, true},
		{"empty range mod > 0", []clientv3.Cmp{cmp(M(p+"none/"), ">", 0).WithPrefix()}, false},
		{"empty range value = empty", []clientv3.Cmp{cmp(Val(p+"none/"), "=", "").WithPrefix()}, false},
		{"from-key range version > 0", []clientv3.Cmp{cmp(V(p+"r/b"), ">", 0).WithRange("\x00")}, true},
		// All compares must hold.
		{"two true", []clientv3.Cmp{cmp(V(k), "=", 2), cmp(Val(k2), "=", "x")}, true},
		{"true and false", []clientv3.Cmp{cmp(V(k), "=", 2), cmp(Val(k2), "=", "y")}, false},
		{"false and true", []clientv3.Cmp{cmp(V(k), "=", 3), cmp(Val(k2), "=", "x")}, false},
		{"no compares", nil, true},
	}
	cases = append(cases,
		txnCase{"lease =", []clientv3.Cmp{cmp(Ls(k), "=", L)}, true},
		txnCase{"lease != 0", []clientv3.Cmp{cmp(Ls(k), "!=", 0)}, true},
		txnCase{"lease > 0", []clientv3.Cmp{cmp(Ls(k), ">", 0)}, true},
		txnCase{"lease < ", []clientv3.Cmp{cmp(Ls(k), "<", L)}, false},
	)
	rev := currentRev(t, cli)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := cli.Txn(ctxT(t)).If(tc.cmps...).Then(clientv3.OpGet(k)).Else(clientv3.OpGet(k2), clientv3.OpGet(m)).Commit()
			requireOK(t, "Txn", err)
			checkHeader(t, "Txn", resp.Header, rev)
			if resp.Succeeded != tc.want {
				t.Fatalf("succeeded=%v, want %v", resp.Succeeded, tc.want)
			}
			wantN, wantKey := 1, k
			if !tc.want {
				wantN, wantKey = 2, k2
			}
			if len(resp.Responses) != wantN {
				t.Fatalf("%d responses, want %d (one per op of the taken branch)", len(resp.Responses), wantN)
			}
			rr := resp.Responses[0].GetResponseRange()
			if rr == nil || len(rr.Kvs) != 1 || string(rr.Kvs[0].Key) != wantKey {
				t.Fatalf("first response %v, want a range response with %q", resp.Responses[0], wantKey)
			}
		})
	}
	if got := currentRev(t, cli); got != rev {
		t.Fatalf("read-only txns changed the revision from %d to %d", rev, got)
	}
}

// TestKVTxnBranches covers the success and failure branches with writes and
// reading the txn's own writes.
func TestKVTxnBranches(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	mustPut(t, cli, p+"k", "v1")
	mustPut(t, cli, p+"gone", "x")
	r0 := currentRev(t, cli)

	// Success branch: writes, then reads see them.
	resp, err := cli.Txn(ctxT(t)).
		If(clientv3.Compare(clientv3.Value(p+"k"), "=", "v1")).
		Then(
			clientv3.OpPut(p+"k", "v2", clientv3.WithPrevKV()),
			clientv3.OpGet(p+"k"),
			clientv3.OpPut(p+"new", "n"),
			clientv3.OpDelete(p+"gone", clientv3.WithPrevKV()),
			clientv3.OpGet(p, clientv3.WithPrefix()),
			clientv3.OpDelete(p+"nothing"),
		).
		Else(clientv3.OpPut(p+"else", "e")).Commit()
	requireOK(t, "txn", err)
	checkHeader(t, "txn", resp.Header, r0+1)
	if !resp.Succeeded || len(resp.Responses) != 6 {
		t.Fatalf("txn: succeeded=%v with %d responses, want true and 6", resp.Succeeded, len(resp.Responses))
	}
	put := resp.Responses[0].GetResponsePut()
	if put == nil || put.Header.GetRevision() != r0+1 {
		t.Fatalf("put response %v, want header revision %d", put, r0+1)
	}
	expectKV(t, "put prev_kv in txn", put.PrevKv, p+"k", "v1", r0-1, r0-1, 1)
	get := resp.Responses[1].GetResponseRange()
	if get == nil || len(get.Kvs) != 1 {
		t.Fatalf("get in txn: %v", resp.Responses[1])
	}
	// The txn reads its own write: one revision for the whole txn.
	expectKV(t, "get own write", get.Kvs[0], p+"k", "v2", r0-1, r0+1, 2)
	if get.Header.GetRevision() != r0+1 {
		t.Fatalf("range response inside a writing txn has header revision %d, want %d", get.Header.GetRevision(), r0+1)
	}
	del := resp.Responses[3].GetResponseDeleteRange()
	if del == nil || del.Deleted != 1 || len(del.PrevKvs) != 1 || string(del.PrevKvs[0].Value) != "x" {
		t.Fatalf("delete in txn: %v", resp.Responses[3])
	}
	all := resp.Responses[4].GetResponseRange()
	if all == nil || !equalStrings(keysOf(all.Kvs, p), []string{"k", "new"}) || all.Count != 2 {
		t.Fatalf("prefix get in txn sees %v, want k and new", all)
	}
	nd := resp.Responses[5].GetResponseDeleteRange()
	if nd == nil || nd.Deleted != 0 {
		t.Fatalf("delete of a missing key in txn: %v", resp.Responses[5])
	}
	if g := mustGet(t, cli, p+"else"); g.Count != 0 {
		t.Fatalf("the else branch was applied too")
	}
	g := mustGet(t, cli, p+"new")
	expectKV(t, "txn put", g.Kvs[0], p+"new", "n", r0+1, r0+1, 1)

	// Failure branch.
	resp, err = cli.Txn(ctxT(t)).
		If(clientv3.Compare(clientv3.Value(p+"k"), "=", "v1")).
		Then(clientv3.OpPut(p+"then", "t")).
		Else(clientv3.OpPut(p+"else", "e"), clientv3.OpGet(p+"else"), clientv3.OpGet(p+"then")).Commit()
	requireOK(t, "txn 2", err)
	checkHeader(t, "txn 2", resp.Header, r0+2)
	if resp.Succeeded || len(resp.Responses) != 3 {
		t.Fatalf("txn 2: succeeded=%v with %d responses, want false and 3", resp.Succeeded, len(resp.Responses))
	}
	if rr := resp.Responses[1].GetResponseRange(); rr == nil || rr.Count != 1 || string(rr.Kvs[0].Value) != "e" {
		t.Fatalf("txn 2 get else: %v", resp.Responses[1])
	}
	if rr := resp.Responses[2].GetResponseRange(); rr == nil || rr.Count != 0 {
		t.Fatalf("txn 2 get then: %v, want nothing", resp.Responses[2])
	}
	if g := mustGet(t, cli, p+"then"); g.Count != 0 {
		t.Fatalf("the then branch of txn 2 was applied")
	}

	// A txn can read at an older revision.
	resp, err = cli.Txn(ctxT(t)).Then(clientv3.OpGet(p+"k", clientv3.WithRev(r0))).Commit()
	requireOK(t, "txn with old read", err)
	if rr := resp.Responses[0].GetResponseRange(); rr == nil || len(rr.Kvs) != 1 || string(rr.Kvs[0].Value) != "v1" {
		t.Fatalf("txn read at revision %d: %v, want v1", r0, resp.Responses[0])
	}
	_, err = cli.Txn(ctxT(t)).Then(clientv3.OpGet(p+"k", clientv3.WithRev(r0+100))).Commit()
	requireEtcdErr(t, "txn read at a future revision", err, rpctypes.ErrFutureRev)
}

// TestKVTxnNested covers txns inside txns (clientv3.OpTxn).
func TestKVTxnNested(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	mustPut(t, cli, p+"flag", "on")
	r0 := currentRev(t, cli)
	isOn := clientv3.Compare(clientv3.Value(p+"flag"), "=", "on")
	isOff := clientv3.Compare(clientv3.Value(p+"flag"), "=", "off")

	resp, err := cli.Txn(ctxT(t)).If(isOn).Then(
		clientv3.OpPut(p+"outer", "1"),
		clientv3.OpTxn([]clientv3.Cmp{isOff},
			[]clientv3.Op{clientv3.OpPut(p+"inner-then", "x")},
			[]clientv3.Op{
				clientv3.OpPut(p+"inner-else", "y"),
				clientv3.OpGet(p + "outer"),
				clientv3.OpTxn([]clientv3.Cmp{isOn},
					[]clientv3.Op{clientv3.OpPut(p+"deep", "z"), clientv3.OpGet(p + "inner-else")},
					nil),
			}),
		clientv3.OpGet(p, clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Else(
		// Not taken: its nested txn must not run either.
		clientv3.OpTxn(nil, []clientv3.Op{clientv3.OpPut(p+"never", "n")}, nil),
	).Commit()
	requireOK(t, "nested txn", err)
	checkHeader(t, "nested txn", resp.Header, r0+1)
	if !resp.Succeeded || len(resp.Responses) != 3 {
		t.Fatalf("outer: succeeded=%v responses=%d, want true and 3", resp.Succeeded, len(resp.Responses))
	}
	inner := resp.Responses[1].GetResponseTxn()
	if inner == nil || inner.Succeeded || len(inner.Responses) != 3 {
		t.Fatalf("inner txn response %v, want a failed txn with 3 responses", resp.Responses[1])
	}
	if rr := inner.Responses[1].GetResponseRange(); rr == nil || len(rr.Kvs) != 1 || string(rr.Kvs[0].Value) != "1" {
		t.Fatalf("inner get of outer's write: %v", inner.Responses[1])
	}
	deep := inner.Responses[2].GetResponseTxn()
	if deep == nil || !deep.Succeeded || len(deep.Responses) != 2 {
		t.Fatalf("deepest txn response %v, want success with 2 responses", inner.Responses[2])
	}
	if rr := deep.Responses[1].GetResponseRange(); rr == nil || len(rr.Kvs) != 1 || string(rr.Kvs[0].Value) != "y" {
		t.Fatalf("deepest get: %v", deep.Responses[1])
	}
	all := resp.Responses[2].GetResponseRange()
	if got := keysOf(all.GetKvs(), p); !equalStrings(got, []string{"deep", "flag", "inner-else", "outer"}) {
		t.Fatalf("keys seen at the end of the txn: %q", got)
	}
	g := mustGet(t, cli, p, clientv3.WithPrefix())
	if got := keysOf(g.Kvs, p); !equalStrings(got, []string{"deep", "flag", "inner-else", "outer"}) {
		t.Fatalf("keys after the nested txn: %q", got)
	}
	for _, kv := range g.Kvs {
		if string(kv.Key) != p+"flag" && kv.ModRevision != r0+1 {
			t.Fatalf("key %q has mod_revision %d, want %d (one revision per txn)", kv.Key, kv.ModRevision, r0+1)
		}
	}
}

// TestKVTxnErrors covers txn validation errors.
func TestKVTxnErrors(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	mustPut(t, cli, p+"k", "v")

	ops := func(n int) []clientv3.Op {
		var o []clientv3.Op
		for i := range n {
			o = append(o, clientv3.OpPut(fmt.Sprintf("%sops/%03d", p, i), "x"))
		}
		return o
	}
	cases := []struct {
		name string
		txn  func() (*clientv3.TxnResponse, error)
		want error // nil = success
	}{
		{"duplicate put", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"d", "1"), clientv3.OpPut(p+"d", "2")).Commit()
		}, rpctypes.ErrDuplicateKey},
		{"duplicate put in else", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Else(clientv3.OpPut(p+"d", "1"), clientv3.OpPut(p+"d", "2")).Commit()
		}, rpctypes.ErrDuplicateKey},
		{"put and delete of the same key", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"k", "1"), clientv3.OpDelete(p+"k")).Commit()
		}, rpctypes.ErrDuplicateKey},
		{"put inside a deleted range", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpDelete(p, clientv3.WithPrefix()), clientv3.OpPut(p+"k", "1")).Commit()
		}, rpctypes.ErrDuplicateKey},
		{"duplicate put across nested txn", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"d", "1"), clientv3.OpTxn(nil, []clientv3.Op{clientv3.OpPut(p+"d", "2")}, nil)).Commit()
		}, rpctypes.ErrDuplicateKey},
		{"same key in then and else is fine", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"te", "1")).Else(clientv3.OpPut(p+"te", "2")).Commit()
		}, nil},
		{"same key in nested then and else is fine", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpTxn(nil, []clientv3.Op{clientv3.OpPut(p+"te2", "1")}, []clientv3.Op{clientv3.OpPut(p+"te2", "2")})).Commit()
		}, nil},
		{"two deletes of the same key are fine", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpDelete(p+"nothing"), clientv3.OpDelete(p+"nothing")).Commit()
		}, nil},
		{"get and put of the same key are fine", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpGet(p+"k"), clientv3.OpPut(p+"k", "v2"), clientv3.OpGet(p+"k")).Commit()
		}, nil},
		{"129 ops", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(ops(129)...).Commit()
		}, rpctypes.ErrTooManyOps},
		{"129 compares", func() (*clientv3.TxnResponse, error) {
			var c []clientv3.Cmp
			for i := range 129 {
				c = append(c, clientv3.Compare(clientv3.Version(fmt.Sprintf("%sc/%d", p, i)), "=", 0))
			}
			return cli.Txn(ctxT(t)).If(c...).Commit()
		}, rpctypes.ErrTooManyOps},
		{"128 ops", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(ops(128)...).Commit()
		}, nil},
		{"empty key in compare", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).If(clientv3.Compare(clientv3.Version(""), "=", 0)).Commit()
		}, rpctypes.ErrEmptyKey},
		{"empty key in put op", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpPut("", "x")).Commit()
		}, rpctypes.ErrEmptyKey},
		{"empty key in get op of the else branch", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Else(clientv3.OpGet("")).Commit()
		}, rpctypes.ErrEmptyKey},
		{"ignore_value on a missing key", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"k", "new"), clientv3.OpPut(p+"absent", "", clientv3.WithIgnoreValue())).Commit()
		}, rpctypes.ErrKeyNotFound},
		{"lease that does not exist", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"k", "new", clientv3.WithLease(0x7e57_0000_0000_0002))).Commit()
		}, rpctypes.ErrLeaseNotFound},
		{"errors in the branch not taken still count (validation)", func() (*clientv3.TxnResponse, error) {
			return cli.Txn(ctxT(t)).If(clientv3.Compare(clientv3.Version(p+"k"), ">", 0)).Else(clientv3.OpPut(p+"e", "1"), clientv3.OpPut(p+"e", "2")).Commit()
		}, rpctypes.ErrDuplicateKey},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rev := currentRev(t, cli)
			resp, err := tc.txn()
			if tc.want != nil {
				requireEtcdErr(t, tc.name, err, tc.want)
			} else {
				requireOK(t, tc.name, err)
				isWrite := false
				for _, r := range resp.Responses {
					if r.GetResponsePut() != nil || r.GetResponseTxn() != nil {
						isWrite = true
					}
				}
				if isWrite {
					rev++
				}
				checkHeader(t, tc.name, resp.Header, rev)
			}
			if got := currentRev(t, cli); got != rev {
				t.Fatalf("revision %d after %q, want %d", got, tc.name, rev)
			}
		})
	}
	// The 128 puts all happened in one revision; the 129-op txn wrote nothing.
	g := mustGet(t, cli, p+"ops/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if len(g.Kvs) == 0 {
		t.Fatalf("128-op txn wrote nothing")
	}
	if g.Count != 128 {
		t.Fatalf("128-op txn: %d keys, want 128", g.Count)
	}
	for _, kv := range g.Kvs {
		if kv.ModRevision != g.Kvs[0].ModRevision || kv.Version != 1 {
			t.Fatalf("128-op txn: key %q has mod_revision %d version %d, want %d and 1", kv.Key, kv.ModRevision, kv.Version, g.Kvs[0].ModRevision)
		}
	}
}

// TestKVCompact covers compaction and reads of compacted revisions.
func TestKVCompact(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	k := p + "k"
	r1 := mustPut(t, cli, k, "v1").Header.Revision
	r2 := mustPut(t, cli, k, "v2").Header.Revision
	r3 := mustPut(t, cli, k, "v3").Header.Revision

	c, err := cli.Compact(ctxT(t), r2)
	requireOK(t, "Compact", err)
	checkHeader(t, "Compact", c.Header, r3)
	if got := currentRev(t, cli); got != r3 {
		t.Fatalf("compaction changed the revision to %d, want %d", got, r3)
	}
	_, err = cli.Get(ctxT(t), k, clientv3.WithRev(r1))
	requireEtcdErr(t, "get at a compacted revision", err, rpctypes.ErrCompacted)
	_, err = cli.Get(ctxT(t), k, clientv3.WithRev(1))
	requireEtcdErr(t, "get at revision 1 after compaction", err, rpctypes.ErrCompacted)
	_, err = cli.Txn(ctxT(t)).Then(clientv3.OpGet(k, clientv3.WithRev(r1))).Commit()
	requireEtcdErr(t, "txn get at a compacted revision", err, rpctypes.ErrCompacted)
	// The compaction revision itself stays readable.
	g := mustGet(t, cli, k, clientv3.WithRev(r2))
	if len(g.Kvs) != 1 || string(g.Kvs[0].Value) != "v2" {
		t.Fatalf("get at the compaction revision %d: %s, want v2", r2, fmtKVs(g.Kvs))
	}
	checkHeader(t, "get at the compaction revision", g.Header, r3)
	g = mustGet(t, cli, k)
	expectKV(t, "latest after compaction", g.Kvs[0], k, "v3", r1, r3, 3)

	_, err = cli.Compact(ctxT(t), r2)
	requireEtcdErr(t, "compact again at the same revision", err, rpctypes.ErrCompacted)
	_, err = cli.Compact(ctxT(t), r1)
	requireEtcdErr(t, "compact at an older revision", err, rpctypes.ErrCompacted)
	_, err = cli.Compact(ctxT(t), r3+1)
	requireEtcdErr(t, "compact at a future revision", err, rpctypes.ErrFutureRev)

	// Physical compaction at the current revision.
	r4 := mustPut(t, cli, k, "v4").Header.Revision
	c, err = cli.Compact(ctxT(t), r4, clientv3.WithCompactPhysical())
	requireOK(t, "physical Compact", err)
	checkHeader(t, "physical Compact", c.Header, r4)
	_, err = cli.Get(ctxT(t), k, clientv3.WithRev(r3))
	requireEtcdErr(t, "get below a physical compaction", err, rpctypes.ErrCompacted)
	g = mustGet(t, cli, k, clientv3.WithRev(r4))
	expectKV(t, "get at the physical compaction revision", g.Kvs[0], k, "v4", r1, r4, 4)
	// Writing continues normally; versions survive compaction.
	r5 := mustPut(t, cli, k, "v5").Header.Revision
	if r5 != r4+1 {
		t.Fatalf("put after compaction at revision %d, want %d", r5, r4+1)
	}
	g = mustGet(t, cli, k)
	expectKV(t, "put after compaction", g.Kvs[0], k, "v5", r1, r5, 5)
	// A deleted key is gone at the compacted revision and stays gone.
	mustDelete(t, cli, k)
	r7 := mustPut(t, cli, p+"other", "x").Header.Revision
	_, err = cli.Compact(ctxT(t), r7)
	requireOK(t, "compact after delete", err)
	if g := mustGet(t, cli, k, clientv3.WithRev(r7)); g.Count != 0 {
		t.Fatalf("deleted key visible after compaction: %s", fmtKVs(g.Kvs))
	}
}

// TestKVEmptyKey: requests with an empty key are refused.
func TestKVEmptyKey(t *testing.T) {
	cli := sharedClient(t)
	r0 := currentRev(t, cli)
	_, err := cli.Put(ctxT(t), "", "v")
	requireEtcdErr(t, "Put of an empty key", err, rpctypes.ErrEmptyKey)
	_, err = cli.Get(ctxT(t), "")
	requireEtcdErr(t, "Get of an empty key", err, rpctypes.ErrEmptyKey)
	_, err = cli.Delete(ctxT(t), "")
	requireEtcdErr(t, "Delete of an empty key", err, rpctypes.ErrEmptyKey)
	_, err = cli.Get(ctxT(t), "", clientv3.WithRange("z"))
	requireEtcdErr(t, "Get of an empty key with range_end", err, rpctypes.ErrEmptyKey)
	if got := currentRev(t, cli); got != r0 {
		t.Fatalf("revision changed from %d to %d", r0, got)
	}
}

// TestKVRequestTooLarge: etcd limits requests to 1.5 MiB (--max-request-bytes
// default). A request above that limit but below the gRPC receive limit
// (max-request-bytes + 512 KiB) gets "etcdserver: request is too large"; a
// larger one is refused by gRPC itself with ResourceExhausted
// ("grpc: received message larger than max"). etcd 3.4 and 3.6/3.7 agree.
func TestKVRequestTooLarge(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	r0 := currentRev(t, cli)

	big := strings.Repeat("x", 1<<20)
	r := mustPut(t, cli, p+"1MiB", big)
	checkHeader(t, "1 MiB put", r.Header, r0+1)
	g := mustGet(t, cli, p+"1MiB")
	if len(g.Kvs) != 1 || len(g.Kvs[0].Value) != 1<<20 {
		t.Fatalf("1 MiB value read back with wrong size")
	}

	_, err := cli.Put(ctxT(t), p+"1.6MiB", strings.Repeat("x", 1<<20+600<<10))
	requireEtcdErr(t, "1.6 MiB put", err, rpctypes.ErrRequestTooLarge)

	_, err = cli.Put(ctxT(t), p+"2MiB", strings.Repeat("x", 2<<20))
	if err == nil {
		t.Fatalf("2 MiB put succeeded; want it refused")
	}
	t.Logf("2 MiB put refused with: %s", errDesc(err))
	switch code := errCode(err); {
	case code == codes.ResourceExhausted:
	case errDesc(err) == errDesc(rpctypes.ErrRequestTooLarge):
	default:
		t.Fatalf("2 MiB put: error %q, want ResourceExhausted or %q", errDesc(err), errDesc(rpctypes.ErrRequestTooLarge))
	}
	// A txn whose total size is too large is refused as well.
	_, err = cli.Txn(ctxT(t)).Then(
		clientv3.OpPut(p+"t1", strings.Repeat("y", 800<<10)),
		clientv3.OpPut(p+"t2", strings.Repeat("y", 800<<10)),
	).Commit()
	requireEtcdErr(t, "1.6 MiB txn", err, rpctypes.ErrRequestTooLarge)
	if got := currentRev(t, cli); got != r0+1 {
		t.Fatalf("revision %d after refused requests, want %d", got, r0+1)
	}
	mustDelete(t, cli, p, clientv3.WithPrefix())
}

// TestKVResponseHeaders: every response header carries the same non-zero
// cluster and member ids, raft_term >= 1 and the right revision.
func TestKVResponseHeaders(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	r0 := currentRev(t, cli)
	var hs []*pb.ResponseHeader
	put := mustPut(t, cli, p+"k", "v")
	checkHeader(t, "put", put.Header, r0+1)
	hs = append(hs, put.Header)
	get := mustGet(t, cli, p+"k")
	checkHeader(t, "get", get.Header, r0+1)
	hs = append(hs, get.Header)
	txn, err := cli.Txn(ctxT(t)).Then(clientv3.OpPut(p+"k", "v2")).Commit()
	requireOK(t, "txn", err)
	checkHeader(t, "txn", txn.Header, r0+2)
	hs = append(hs, txn.Header)
	del := mustDelete(t, cli, p+"k")
	checkHeader(t, "delete", del.Header, r0+3)
	hs = append(hs, del.Header)
	st, err := cli.Status(ctxT(t), shared(t).Endpoint())
	requireOK(t, "status", err)
	checkHeader(t, "status", st.Header, r0+3)
	hs = append(hs, st.Header)
	for i, h := range hs[1:] {
		if h.ClusterId != hs[0].ClusterId || h.MemberId != hs[0].MemberId {
			t.Fatalf("header %d: cluster_id=%x member_id=%x differ from the first (%x, %x)", i+1, h.ClusterId, h.MemberId, hs[0].ClusterId, hs[0].MemberId)
		}
		if h.RaftTerm < hs[0].RaftTerm {
			t.Fatalf("raft_term went backwards: %d after %d", h.RaftTerm, hs[0].RaftTerm)
		}
	}
}
