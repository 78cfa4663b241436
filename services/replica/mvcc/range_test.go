package mvcc

import (
	"bytes"
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// trickyKeys contain zero bytes and are prefixes of each other, which the escaped index
// keys must order exactly as the raw keys.
var trickyKeys = []string{
	"\x00", "\x00\x00", "\x00\x01", "a", "a\x00", "a\x00\x00", "a\x00\x00b", "a\x00\x01", "a\x00b", "a\x00\xff",
	"a\x01", "a\xff", "ab", "ab\x00", "abc", "b", "b\x00", "ba", "c\xff", "\xff", "\xff\x00", "\xff\xff",
}

// rangeBound is an etcd range: end "" means the single key; "\x00" means every key
// from key on.
type rangeBound struct{ key, end string }

func (b rangeBound) String() string { return fmt.Sprintf("[%q, %q)", b.key, b.end) }

func (b rangeBound) req() *pb.RangeRequest {
	r := &pb.RangeRequest{Key: []byte(b.key)}
	if b.end != "" {
		r.RangeEnd = []byte(b.end)
	}
	return r
}

// bruteForce selects, from keys, the ones inside b by plain byte comparison.
func (b rangeBound) bruteForce(keys []string) []string {
	var out []string
	for _, k := range keys {
		var in bool
		switch b.end {
		case "":
			in = k == b.key
		case "\x00":
			in = k >= b.key
		default:
			in = k >= b.key && k < b.end
		}
		if in {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// trickyBounds covers single keys, prefixes, [key, end) around zero bytes, "\x00"
// ends, and empty or inverted ranges.
func trickyBounds() []rangeBound {
	var out []rangeBound
	for _, k := range trickyKeys {
		out = append(out, rangeBound{k, ""}, rangeBound{k, prefixEnd(k)}, rangeBound{k, "\x00"}, rangeBound{k, k + "\x00"})
	}
	out = append(out,
		rangeBound{"", "\x00"},
		rangeBound{"a", "b"},
		rangeBound{"a\x00", "a\x01"},
		rangeBound{"a\x00", "a\x00\x01"},
		rangeBound{"a\x00\x00", "a\x00b"},
		rangeBound{"a", "a\x00"},
		rangeBound{"a", "a"},           // empty
		rangeBound{"b", "a"},           // inverted
		rangeBound{"ab", "a\x00"},      // inverted
		rangeBound{"\xff\xff", "\x01"}, // inverted
		rangeBound{"missing", ""},
		rangeBound{"a\x00c", ""},
		rangeBound{"", "\xff"},
		rangeBound{"\x00", "a"},
	)
	return out
}

// checkRange compares a range read with the model, with a message that names the read.
func checkRange(t *testing.T, e *testEnv, m *model, what string, r *pb.RangeRequest) {
	t.Helper()
	got, err := e.rangeReq(r)
	want, wantErr := m.rangeAt(r, m.rev)
	if wantErr != nil || err != nil {
		if !isErr(err, wantErr) || (wantErr == nil) != (err == nil) {
			t.Errorf("%s: %v: err = %v, want %v", what, r, err, wantErr)
		}
		return
	}
	if !proto.Equal(got, want) {
		t.Errorf("%s: %v:%s", what, r, protoDiff(got, want))
	}
}

func TestRangeKeySelection(t *testing.T) {
	e := newEnv(t)
	m := newModel(leaseSet{})
	write := func(reqs ...proto.Message) {
		t.Helper()
		for _, r := range reqs {
			got, err := e.apply(r)
			want, wantErr := m.apply(r)
			if err != nil || wantErr != nil {
				t.Fatalf("write %v: err %v, model err %v", r, err, wantErr)
			}
			if !proto.Equal(got, want) {
				t.Fatalf("write %v:%s", r, protoDiff(got, want))
			}
		}
	}
	// State 1: every tricky key, in shuffled order.
	order := slices.Clone(trickyKeys)
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	for _, k := range order {
		write(&pb.PutRequest{Key: []byte(k), Value: []byte("1:" + k)})
	}
	rev1 := m.rev
	// State 2 (one revision): everything deleted.
	write(&pb.DeleteRangeRequest{Key: []byte{}, RangeEnd: []byte{0}})
	rev2 := m.rev
	// State 3: every other key again, and new keys in between.
	for i, k := range trickyKeys {
		if i%2 == 0 {
			write(&pb.PutRequest{Key: []byte(k), Value: []byte("3:" + k)})
		}
	}
	write(&pb.PutRequest{Key: []byte("a\x00a"), Value: []byte("new")}, &pb.PutRequest{Key: []byte("aa"), Value: []byte("new")})
	rev3 := m.rev
	// State 4 (current): some overwritten, some deleted.
	write(&pb.PutRequest{Key: []byte("a"), Value: []byte("4")}, &pb.DeleteRangeRequest{Key: []byte("a\x00"), RangeEnd: []byte("a\x00b")},
		&pb.PutRequest{Key: []byte("a\x00\x01"), Value: []byte("4")})

	// The brute-force selection itself, spot-checked by hand.
	for b, want := range map[rangeBound][]string{
		{"a", prefixEnd("a")}: {"a", "a\x00", "a\x00\x00", "a\x00\x00b", "a\x00\x01", "a\x00b", "a\x00\xff", "a\x01", "ab", "ab\x00", "abc", "a\xff"},
		{"a\x00", "a\x01"}:    {"a\x00", "a\x00\x00", "a\x00\x00b", "a\x00\x01", "a\x00b", "a\x00\xff"},
		{"a", "a\x00"}:        {"a"},
		{"\xff", "\x00"}:      {"\xff", "\xff\x00", "\xff\xff"},
		{"a\x00\x00", ""}:     {"a\x00\x00"},
		{"b", "a"}:            nil,
	} {
		if got := b.bruteForce(trickyKeys); !slices.Equal(got, want) {
			t.Fatalf("test bug: bruteForce(%v) = %q, want %q", b, got, want)
		}
		resp := e.mustRange(&pb.RangeRequest{Key: []byte(b.key), RangeEnd: []byte(b.end), Revision: rev1})
		if got := keysOf(resp.GetKvs()); !slices.Equal(got, want) && !(len(got) == 0 && len(want) == 0) {
			t.Errorf("range %v at revision %d: keys %q, want %q", b, rev1, got, want)
		}
	}

	for _, b := range trickyBounds() {
		for _, rev := range []int64{0, rev1 - 1, rev1, rev2, rev3, m.rev} {
			r := b.req()
			r.Revision = rev
			checkRange(t, e, m, fmt.Sprintf("range %v at revision %d", b, rev), r)
			c := b.req()
			c.Revision, c.CountOnly = rev, true
			checkRange(t, e, m, fmt.Sprintf("count %v at revision %d", b, rev), c)
		}
	}
}

// A read at a revision before a key's first version must find nothing. When that key
// is the last one of the index, the store seeks past the index into the metadata keys.
func TestRangeAtRevisionBeforeKeyExisted(t *testing.T) {
	for _, tc := range []struct {
		name string
		keys []string // written in this order, one revision each
		read string
		rev  int64
	}{
		{"only key", []string{"a"}, "a", 1},
		{"last key in byte order, written last", []string{"a", "z"}, "z", 2},
		{"last key in byte order, written first", []string{"z", "a"}, "z", 1},
		{"middle key", []string{"a", "m", "z"}, "m", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			for _, k := range tc.keys {
				e.mustPut(k, "v")
			}
			for _, r := range []*pb.RangeRequest{
				{Key: []byte(tc.read), Revision: tc.rev},
				{Key: []byte(tc.read), RangeEnd: []byte{0}, Revision: tc.rev},
				{Key: []byte(tc.read), RangeEnd: []byte(prefixEnd(tc.read)), Revision: tc.rev},
			} {
				resp, err := e.rangeReq(r)
				if err != nil {
					t.Fatalf("range %v: %v", r, err)
				}
				for _, kv := range resp.GetKvs() {
					if bytes.Equal(kv.GetKey(), []byte(tc.read)) {
						t.Errorf("range %v returned %q, which did not exist at revision %d", r, tc.read, tc.rev)
					}
				}
			}
		})
	}
}

func TestRangeLimitMoreCount(t *testing.T) {
	e := newEnv(t)
	m := newModel(leaseSet{})
	keys := []string{"k1", "k2", "k3", "k4", "k5"}
	for _, k := range keys {
		r := &pb.PutRequest{Key: []byte(k), Value: []byte("v" + k)}
		e.mustPut(k, "v"+k)
		m.apply(r)
	}
	hist := m.rev
	// Change the current state so historical reads differ.
	for _, r := range []proto.Message{
		&pb.DeleteRangeRequest{Key: []byte("k2")},
		&pb.PutRequest{Key: []byte("k6"), Value: []byte("v6")},
	} {
		if _, err := e.apply(r); err != nil {
			t.Fatal(err)
		}
		m.apply(r)
	}
	for _, rev := range []int64{0, hist} {
		for _, limit := range []int64{0, 1, 2, 4, 5, 6, 100, -1} {
			base := &pb.RangeRequest{Key: []byte("k"), RangeEnd: []byte("l"), Revision: rev, Limit: limit}
			checkRange(t, e, m, "limit", base)
			r := proto.Clone(base).(*pb.RangeRequest)
			r.CountOnly = true
			checkRange(t, e, m, "count_only with limit", r)
			r = proto.Clone(base).(*pb.RangeRequest)
			r.KeysOnly = true
			checkRange(t, e, m, "keys_only with limit", r)
		}
	}
	// Spelled out once: limit 2 of 5 keys.
	resp := e.mustRange(&pb.RangeRequest{Key: []byte("k"), RangeEnd: []byte("l"), Revision: hist, Limit: 2})
	if len(resp.GetKvs()) != 2 || !resp.GetMore() || resp.GetCount() != 5 {
		t.Errorf("limit 2 over 5 keys: %d kvs, more %v, count %d; want 2, true, 5", len(resp.GetKvs()), resp.GetMore(), resp.GetCount())
	}
	resp = e.mustRange(&pb.RangeRequest{Key: []byte("k"), RangeEnd: []byte("l"), Limit: 5})
	if len(resp.GetKvs()) != 5 || resp.GetMore() || resp.GetCount() != 5 {
		t.Errorf("limit 5 over 5 keys: %d kvs, more %v, count %d; want 5, false, 5", len(resp.GetKvs()), resp.GetMore(), resp.GetCount())
	}
	resp = e.mustRange(&pb.RangeRequest{Key: []byte("k"), RangeEnd: []byte("l"), CountOnly: true, Limit: 1})
	if len(resp.GetKvs()) != 0 || resp.GetMore() || resp.GetCount() != 5 {
		t.Errorf("count_only: %v; want only count 5", resp)
	}
	resp = e.mustRange(&pb.RangeRequest{Key: []byte("k"), RangeEnd: []byte("l"), KeysOnly: true})
	for _, kv := range resp.GetKvs() {
		if kv.GetValue() != nil || kv.GetVersion() != 1 || kv.GetModRevision() == 0 {
			t.Errorf("keys_only returned %v; want no value but the revisions and version", kv)
		}
	}
}

// sortFixture writes keys whose version, create, mod revision and value orders all
// differ, with ties, at a mix of revisions.
func sortFixture(t *testing.T, e *testEnv, m *model) {
	t.Helper()
	writes := []struct{ key, value string }{
		{"d", "x"}, {"b", "m"}, {"a", "z"}, {"c", "m"}, {"e", "a"}, {"b", "b"}, {"d", "y"},
		{"a", "z"}, {"f", ""}, {"c", "q"}, {"d", "x"}, {"g", "m"}, {"h", "b"},
	}
	for _, w := range writes {
		r := &pb.PutRequest{Key: []byte(w.key), Value: []byte(w.value)}
		if _, err := e.apply(r); err != nil {
			t.Fatal(err)
		}
		m.apply(r)
	}
}

func TestRangeSort(t *testing.T) {
	e := newEnv(t)
	m := newModel(leaseSet{})
	sortFixture(t, e, m)
	targets := []pb.RangeRequest_SortTarget{pb.RangeRequest_KEY, pb.RangeRequest_VERSION, pb.RangeRequest_CREATE, pb.RangeRequest_MOD, pb.RangeRequest_VALUE}
	orders := []pb.RangeRequest_SortOrder{pb.RangeRequest_NONE, pb.RangeRequest_ASCEND, pb.RangeRequest_DESCEND}
	for _, target := range targets {
		for _, order := range orders {
			for _, rev := range []int64{0, 9, m.rev - 1} {
				for _, limit := range []int64{0, 1, 3} {
					what := fmt.Sprintf("sort %v %v at revision %d limit %d", target, order, rev, limit)
					r := &pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte("z"), SortTarget: target, SortOrder: order, Revision: rev, Limit: limit}
					checkRange(t, e, m, what, r)
					if limit != 0 {
						continue
					}
					// Independently of the model: the result is ordered by the target.
					resp := e.mustRange(r)
					effective := order
					if target != pb.RangeRequest_KEY && order == pb.RangeRequest_NONE {
						effective = pb.RangeRequest_ASCEND
					}
					less := sortLess(target)
					kvs := resp.GetKvs()
					for i := 1; i < len(kvs); i++ {
						a, b := kvs[i-1], kvs[i]
						switch effective {
						case pb.RangeRequest_ASCEND:
							if less(b, a) {
								t.Errorf("%s: %q before %q out of order", what, a.GetKey(), b.GetKey())
							}
						case pb.RangeRequest_DESCEND:
							if less(a, b) {
								t.Errorf("%s: %q before %q out of order", what, a.GetKey(), b.GetKey())
							}
						case pb.RangeRequest_NONE:
							if bytes.Compare(a.GetKey(), b.GetKey()) >= 0 {
								t.Errorf("%s: unsorted result not in key order: %q before %q", what, a.GetKey(), b.GetKey())
							}
						}
					}
					if int64(len(kvs)) != resp.GetCount() {
						t.Errorf("%s: %d kvs, count %d", what, len(kvs), resp.GetCount())
					}
				}
			}
		}
	}
}

func TestRangeRevisionFilters(t *testing.T) {
	e := newEnv(t)
	m := newModel(leaseSet{})
	sortFixture(t, e, m)
	for _, rev := range []int64{0, 8} {
		for _, f := range []struct {
			minMod, maxMod, minCreate, maxCreate int64
		}{
			{minMod: 8}, {maxMod: 8}, {minCreate: 4}, {maxCreate: 4}, {minMod: 5, maxMod: 11},
			{minCreate: 3, maxCreate: 6, minMod: 9}, {minMod: 100}, {maxMod: 1},
		} {
			for _, limit := range []int64{0, 1, 2} {
				r := &pb.RangeRequest{
					Key: []byte("a"), RangeEnd: []byte{0}, Revision: rev, Limit: limit,
					MinModRevision: f.minMod, MaxModRevision: f.maxMod, MinCreateRevision: f.minCreate, MaxCreateRevision: f.maxCreate,
				}
				checkRange(t, e, m, "filter", r)
				// count is taken before the filters, as in etcd.
				resp := e.mustRange(r)
				all := m.liveAt([]byte("a"), []byte{0}, m.rev)
				if rev != 0 {
					all = m.liveAt([]byte("a"), []byte{0}, rev)
				}
				if resp.GetCount() != int64(len(all)) {
					t.Errorf("filter %+v at %d: count %d, want %d (count ignores filters)", f, rev, resp.GetCount(), len(all))
				}
			}
		}
	}
}

func TestRangeRevisionErrors(t *testing.T) {
	e := newEnv(t)
	for i := 0; i < 5; i++ {
		e.mustPut("k", fmt.Sprint(i)) // revisions 2..6
	}
	e.mustCompact(4)
	tests := []struct {
		rev  int64
		want error
	}{
		{7, etcderr.ErrFutureRev},
		{100, etcderr.ErrFutureRev},
		{3, etcderr.ErrCompacted},
		{1, etcderr.ErrCompacted},
		{4, nil},
		{6, nil},
		{0, nil},
		{-1, nil}, // negative means current, as in etcd
	}
	for _, tc := range tests {
		for _, r := range []*pb.RangeRequest{
			{Key: []byte("k"), Revision: tc.rev},
			{Key: []byte("a"), RangeEnd: []byte{0}, Revision: tc.rev, CountOnly: true},
		} {
			_, err := e.rangeReq(r)
			if !isErr(err, tc.want) || (tc.want == nil && err != nil) {
				t.Errorf("range %v: err = %v, want %v", r, err, tc.want)
			}
		}
	}
	// At the compaction revision, the value visible there is still readable.
	if got := e.get("k", 4); string(got.GetValue()) != "2" || got.GetModRevision() != 4 {
		t.Errorf("k at the compaction revision = %v, want value 2 mod 4", got)
	}
}

// randomHistory applies n random single-request writes over keys to both the store and
// the model, checking every response.
func randomHistory(t *testing.T, e *testEnv, m *model, rng *rand.Rand, keys []string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		var r proto.Message
		k := keys[rng.IntN(len(keys))]
		switch p := rng.IntN(10); {
		case p < 6:
			r = &pb.PutRequest{Key: []byte(k), Value: []byte(fmt.Sprintf("v%d", i)), PrevKv: rng.IntN(2) == 0}
		case p < 8:
			r = &pb.DeleteRangeRequest{Key: []byte(k), PrevKv: rng.IntN(2) == 0}
		default:
			b := rangeBound{k, keys[rng.IntN(len(keys))]}
			if rng.IntN(3) == 0 {
				b.end = prefixEnd(k)
			}
			r = &pb.DeleteRangeRequest{Key: []byte(b.key), RangeEnd: []byte(b.end), PrevKv: rng.IntN(2) == 0}
		}
		got, err := e.apply(r)
		want, wantErr := m.apply(r)
		if err != nil || wantErr != nil {
			t.Fatalf("write %v: err %v, model err %v", r, err, wantErr)
		}
		if !proto.Equal(got, want) {
			t.Fatalf("write %v:%s", r, protoDiff(got, want))
		}
	}
}

// Every revision of a random history, read through a variety of ranges, matches the
// model.
func TestRangeEveryRevisionMatchesModel(t *testing.T) {
	seed := testSeed(t)
	rng := rand.New(rand.NewPCG(seed, 99))
	e := newEnv(t)
	m := newModel(leaseSet{})
	randomHistory(t, e, m, rng, trickyKeys, 300)
	bounds := trickyBounds()
	for rev := int64(1); rev <= m.rev; rev++ {
		checkRange(t, e, m, fmt.Sprintf("everything at %d", rev), &pb.RangeRequest{Key: []byte{}, RangeEnd: []byte{0}, Revision: rev})
		for i := 0; i < 6; i++ {
			r := bounds[rng.IntN(len(bounds))].req()
			r.Revision = rev
			if rng.IntN(3) == 0 {
				r.Limit = int64(rng.IntN(4))
			}
			checkRange(t, e, m, fmt.Sprintf("seed %d", seed), r)
		}
		if t.Failed() {
			t.Fatalf("seed %d: stopping at revision %d", seed, rev)
		}
	}
	// And per key: every version of every key at every revision.
	for _, k := range trickyKeys {
		for rev := int64(1); rev <= m.rev; rev++ {
			if got, want := e.get(k, rev), m.at(k, rev); !proto.Equal(got, want) {
				t.Fatalf("seed %d: %q at %d:%s", seed, k, rev, protoDiff(got, want))
			}
		}
	}
}

// A read of one key at the current revision answers from Store.recent until the next
// commit: the same answer as Pebble's, a fresh message each time (changing one answer
// changes no other), and after a put or a delete the new state, never the cached one.
func TestRecentReads(t *testing.T) {
	e := newEnv(t)
	get := func(key string) *pb.RangeResponse {
		t.Helper()
		resp, err := e.rangeReq(&pb.RangeRequest{Key: []byte(key)})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	value := func(resp *pb.RangeResponse) string {
		if len(resp.Kvs) == 0 {
			return "<none>"
		}
		return string(resp.Kvs[0].Value)
	}
	e.mustPut("a", "1")
	first := get("a")
	slot := e.s.recent[maphash.Bytes(e.s.recentSeed, []byte("a"))&(recentSlots-1)].Load()
	if slot == nil || string(slot.key) != "a" || string(slot.kv.GetValue()) != "1" {
		t.Fatalf("the read was not kept: %+v", slot)
	}
	first.Kvs[0].Value, first.Kvs[0].Key = []byte("changed"), []byte("changed")
	if second := get("a"); value(second) != "1" || string(second.Kvs[0].Key) != "a" || second.Header.Revision != first.Header.Revision {
		t.Fatalf("a kept read answered %+v", second)
	}
	if got := get("missing"); len(got.Kvs) != 0 || got.Count != 0 {
		t.Fatalf("a missing key: %+v", got)
	}
	if got := get("missing"); len(got.Kvs) != 0 || got.Count != 0 {
		t.Fatalf("a missing key, kept: %+v", got)
	}
	e.mustPut("missing", "now")
	if got := get("missing"); value(got) != "now" {
		t.Fatalf("after a put of a key kept as missing: %s", value(got))
	}
	put := e.mustPut("a", "2")
	if got := get("a"); value(got) != "2" || got.Header.Revision != put.Header.Revision {
		t.Fatalf("after a put: %s at %d, want 2 at %d", value(got), got.Header.Revision, put.Header.Revision)
	}
	e.mustDelete("a", "")
	if got := get("a"); value(got) != "<none>" {
		t.Fatalf("after a delete: %s", value(got))
	}
	if got, err := e.rangeReq(&pb.RangeRequest{Key: []byte("missing"), CountOnly: true}); err != nil || got.Count != 1 || len(got.Kvs) != 0 {
		t.Fatalf("count only: %+v, %v", got, err)
	}
}
