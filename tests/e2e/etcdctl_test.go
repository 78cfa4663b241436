package e2e

import (
	"encoding/json"
	"fmt"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// JSON shapes printed by `etcdctl -w json` (etcd 3.4's etcdctl marshals the
// protobuf structs with encoding/json: snake_case fields, bytes in base64,
// which encoding/json decodes into []byte for us).

type ctlHeader struct {
	ClusterID uint64 `json:"cluster_id"`
	MemberID  uint64 `json:"member_id"`
	Revision  int64  `json:"revision"`
	RaftTerm  uint64 `json:"raft_term"`
}

type ctlKV struct {
	Key            []byte `json:"key"`
	CreateRevision int64  `json:"create_revision"`
	ModRevision    int64  `json:"mod_revision"`
	Version        int64  `json:"version"`
	Value          []byte `json:"value"`
	Lease          int64  `json:"lease"`
}

type ctlPut struct {
	Header ctlHeader `json:"header"`
	PrevKV *ctlKV    `json:"prev_kv"`
}

type ctlGet struct {
	Header ctlHeader `json:"header"`
	KVs    []ctlKV   `json:"kvs"`
	More   bool      `json:"more"`
	Count  int64     `json:"count"`
}

type ctlDel struct {
	Header  ctlHeader `json:"header"`
	Deleted int64     `json:"deleted"`
	PrevKVs []ctlKV   `json:"prev_kvs"`
}

type ctlTxn struct {
	Header    ctlHeader `json:"header"`
	Succeeded bool      `json:"succeeded"`
	Responses []struct {
		Response struct {
			ResponsePut         *ctlPut `json:"ResponsePut"`
			ResponseRange       *ctlGet `json:"ResponseRange"`
			ResponseDeleteRange *ctlDel `json:"ResponseDeleteRange"`
		} `json:"Response"`
	} `json:"responses"`
}

type ctlEndpointStatus struct {
	Endpoint string `json:"Endpoint"`
	Status   struct {
		Header    ctlHeader `json:"header"`
		Version   string    `json:"version"`
		DBSize    int64     `json:"dbSize"`
		Leader    uint64    `json:"leader"`
		RaftIndex uint64    `json:"raftIndex"`
		RaftTerm  uint64    `json:"raftTerm"`
	} `json:"Status"`
}

type ctlMemberList struct {
	Header  ctlHeader `json:"header"`
	Members []struct {
		ID         uint64   `json:"ID"`
		Name       string   `json:"name"`
		PeerURLs   []string `json:"peerURLs"`
		ClientURLs []string `json:"clientURLs"`
	} `json:"members"`
}

type ctlHealth struct {
	Endpoint string `json:"endpoint"`
	Health   bool   `json:"health"`
	Error    string `json:"error"`
}

// ctl runs etcdctl against the shared server and requires success.
func ctl(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	r := etcdclient.Etcdctl(t, shared(t).Endpoint(), stdin, args...)
	if r.Err != nil {
		t.Fatalf("etcdctl failed:\n%s", r)
	}
	return r.Stdout
}

// ctlJSON runs etcdctl with -w json and decodes its output into v.
func ctlJSON(t *testing.T, v any, stdin string, args ...string) {
	t.Helper()
	out := ctl(t, stdin, append(args, "-w", "json")...)
	// Start from the zero value: json.Unmarshal merges into what is there,
	// and etcdctl omits false/zero fields.
	reflect.ValueOf(v).Elem().SetZero()
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("etcdctl %s: cannot parse JSON output %q: %v", strings.Join(args, " "), out, err)
	}
}

// ctlFail runs etcdctl, requires it to fail and returns its stderr.
func ctlFail(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	r := etcdclient.Etcdctl(t, shared(t).Endpoint(), stdin, args...)
	if r.Err == nil {
		t.Fatalf("etcdctl succeeded, want failure:\n%s", r)
	}
	return r.Stderr
}

func checkCtlHeader(t *testing.T, what string, h ctlHeader, wantRev int64) {
	t.Helper()
	if h.ClusterID == 0 || h.MemberID == 0 || h.RaftTerm < 1 {
		t.Errorf("%s: header %+v: cluster_id, member_id must be non-zero and raft_term >= 1", what, h)
	}
	if wantRev > 0 && h.Revision != wantRev {
		t.Errorf("%s: header revision %d, want %d", what, h.Revision, wantRev)
	}
}

func ctlKeys(kvs []ctlKV, prefix string) []string {
	out := []string{}
	for _, kv := range kvs {
		out = append(out, strings.TrimPrefix(string(kv.Key), prefix))
	}
	return out
}

// TestEtcdctlPutGetDel drives put/get/del through etcdctl -w json.
func TestEtcdctlPutGetDel(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	r0 := currentRev(t, cli)

	var put ctlPut
	ctlJSON(t, &put, "", "put", p+"a", "va1")
	checkCtlHeader(t, "put a", put.Header, r0+1)
	if put.PrevKV != nil {
		t.Errorf("put without --prev-kv printed a prev_kv")
	}
	ctlJSON(t, &put, "", "put", "--prev-kv", p+"a", "va2")
	checkCtlHeader(t, "put a again", put.Header, r0+2)
	if put.PrevKV == nil || string(put.PrevKV.Key) != p+"a" || string(put.PrevKV.Value) != "va1" || put.PrevKV.Version != 1 {
		t.Errorf("put --prev-kv: prev_kv %+v, want key %q value va1 version 1", put.PrevKV, p+"a")
	}
	ctl(t, "", "put", p+"b", "vb")
	ctl(t, "", "put", p+"c", "a value with spaces")

	var get ctlGet
	ctlJSON(t, &get, "", "get", p+"a")
	checkCtlHeader(t, "get a", get.Header, r0+4)
	if get.Count != 1 || len(get.KVs) != 1 {
		t.Fatalf("get a: count %d kvs %d, want 1", get.Count, len(get.KVs))
	}
	kv := get.KVs[0]
	if string(kv.Key) != p+"a" || string(kv.Value) != "va2" || kv.CreateRevision != r0+1 || kv.ModRevision != r0+2 || kv.Version != 2 {
		t.Errorf("get a: %+v (key %q value %q), want va2 created %d modified %d version 2", kv, kv.Key, kv.Value, r0+1, r0+2)
	}

	ctlJSON(t, &get, "", "get", "--prefix", "--limit=2", p)
	if get.Count != 3 || !get.More || !equalStrings(ctlKeys(get.KVs, p), []string{"a", "b"}) {
		t.Errorf("get --prefix --limit=2: count %d more %v keys %q, want 3, true, [a b]", get.Count, get.More, ctlKeys(get.KVs, p))
	}
	ctlJSON(t, &get, "", "get", p+"a", p+"c") // range [a, c)
	if get.Count != 2 || !equalStrings(ctlKeys(get.KVs, p), []string{"a", "b"}) {
		t.Errorf("get a c: keys %q count %d, want [a b] 2", ctlKeys(get.KVs, p), get.Count)
	}
	ctlJSON(t, &get, "", "get", "--prefix", "--sort-by=VALUE", "--order=DESCEND", p)
	if !equalStrings(ctlKeys(get.KVs, p), []string{"b", "a", "c"}) {
		t.Errorf("get --sort-by=VALUE --order=DESCEND: keys %q, want [b a c]", ctlKeys(get.KVs, p))
	}
	ctlJSON(t, &get, "", "get", "--prefix", "--sort-by=CREATE", "--order=DESCEND", p)
	if !equalStrings(ctlKeys(get.KVs, p), []string{"c", "b", "a"}) {
		t.Errorf("get --sort-by=CREATE --order=DESCEND: keys %q, want [c b a]", ctlKeys(get.KVs, p))
	}
	ctlJSON(t, &get, "", "get", "--prefix", "--keys-only", p)
	if get.Count != 3 || len(get.KVs) != 3 {
		t.Fatalf("get --keys-only: %d kvs", len(get.KVs))
	}
	for _, kv := range get.KVs {
		if len(kv.Value) != 0 {
			t.Errorf("get --keys-only returned value %q for %q", kv.Value, kv.Key)
		}
	}
	ctlJSON(t, &get, "", "get", "--rev="+strconv.FormatInt(r0+1, 10), p+"a")
	if len(get.KVs) != 1 || string(get.KVs[0].Value) != "va1" {
		t.Errorf("get --rev=%d: %+v, want va1", r0+1, get.KVs)
	}
	checkCtlHeader(t, "get --rev", get.Header, r0+4)
	ctlJSON(t, &get, "", "get", "--consistency=s", p+"c")
	if len(get.KVs) != 1 || string(get.KVs[0].Value) != "a value with spaces" {
		t.Errorf("serializable get c: %+v", get.KVs)
	}
	if out := ctl(t, "", "get", "--print-value-only", p+"c"); out != "a value with spaces\n" {
		t.Errorf("get --print-value-only: %q", out)
	}
	if out := ctl(t, "", "get", p+"a"); out != p+"a\nva2\n" {
		t.Errorf("get (simple output): %q, want key and value lines", out)
	}
	stderr := ctlFail(t, "", "get", "--rev="+strconv.FormatInt(r0+1000, 10), p+"a")
	if !strings.Contains(stderr, "etcdserver: mvcc: required revision is a future revision") {
		t.Errorf("get at a future revision: stderr %q", stderr)
	}

	var del ctlDel
	ctlJSON(t, &del, "", "del", "--prev-kv", p+"a")
	checkCtlHeader(t, "del a", del.Header, r0+5)
	if del.Deleted != 1 || len(del.PrevKVs) != 1 || string(del.PrevKVs[0].Value) != "va2" {
		t.Errorf("del --prev-kv a: %+v", del)
	}
	ctlJSON(t, &del, "", "del", p+"nothing")
	checkCtlHeader(t, "del nothing", del.Header, r0+5)
	if del.Deleted != 0 {
		t.Errorf("del of a missing key: deleted %d", del.Deleted)
	}
	ctlJSON(t, &del, "", "del", "--prefix", p)
	checkCtlHeader(t, "del --prefix", del.Header, r0+6)
	if del.Deleted != 2 {
		t.Errorf("del --prefix: deleted %d, want 2", del.Deleted)
	}
	ctlJSON(t, &get, "", "get", "--prefix", p)
	if get.Count != 0 {
		t.Errorf("after del --prefix: count %d", get.Count)
	}
}

// TestEtcdctlTxn drives txns through etcdctl's stdin format: compares, blank
// line, success ops, blank line, failure ops, blank line.
func TestEtcdctlTxn(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	mustPut(t, cli, p+"k", "v1")
	r0 := currentRev(t, cli)

	in := fmt.Sprintf("value(%q) = \"v1\"\nversion(%q) = \"1\"\n\nput %s v2\nget %s\ndel %s\n\nput %s else\n\n",
		p+"k", p+"k", p+"k", p+"k", p+"nothing", p+"else")
	var txn ctlTxn
	ctlJSON(t, &txn, in, "txn")
	checkCtlHeader(t, "txn", txn.Header, r0+1)
	if !txn.Succeeded || len(txn.Responses) != 3 {
		t.Fatalf("txn: succeeded %v with %d responses, want true and 3", txn.Succeeded, len(txn.Responses))
	}
	if r := txn.Responses[0].Response.ResponsePut; r == nil || r.Header.Revision != r0+1 {
		t.Errorf("txn put response %+v, want header revision %d", r, r0+1)
	}
	if r := txn.Responses[1].Response.ResponseRange; r == nil || r.Count != 1 || string(r.KVs[0].Value) != "v2" || r.KVs[0].ModRevision != r0+1 {
		t.Errorf("txn get response %+v, want the txn's own write v2 at %d", r, r0+1)
	}
	if r := txn.Responses[2].Response.ResponseDeleteRange; r == nil || r.Deleted != 0 {
		t.Errorf("txn del response %+v, want deleted 0", r)
	}

	// The compare fails now: the failure branch runs.
	ctlJSON(t, &txn, in, "txn")
	checkCtlHeader(t, "second txn", txn.Header, r0+2)
	if txn.Succeeded || len(txn.Responses) != 1 || txn.Responses[0].Response.ResponsePut == nil {
		t.Fatalf("second txn: succeeded %v responses %d, want false and 1 put", txn.Succeeded, len(txn.Responses))
	}
	var get ctlGet
	ctlJSON(t, &get, "", "get", "--prefix", p)
	if !equalStrings(ctlKeys(get.KVs, p), []string{"else", "k"}) {
		t.Errorf("keys after the txns: %q, want [else k]", ctlKeys(get.KVs, p))
	}

	// Simple output and mod/create compares.
	in2 := fmt.Sprintf("mod(%q) > \"%d\"\ncreate(%q) < \"%d\"\n\nput %s v3\n\n\n", p+"k", r0, p+"k", r0+1, p+"k")
	out := ctl(t, in2, "txn")
	if !strings.HasPrefix(out, "SUCCESS\n") {
		t.Errorf("txn simple output %q, want SUCCESS", out)
	}
	if g := mustGet(t, cli, p+"k"); string(g.Kvs[0].Value) != "v3" {
		t.Errorf("after simple txn: %s", fmtKVs(g.Kvs))
	}
}

// TestEtcdctlCompaction compacts with etcdctl and reads a compacted revision.
func TestEtcdctlCompaction(t *testing.T) {
	cli := sharedClient(t)
	p := prefixFor(t)
	r1 := mustPut(t, cli, p+"k", "v1").Header.Revision
	r2 := mustPut(t, cli, p+"k", "v2").Header.Revision
	r3 := mustPut(t, cli, p+"k", "v3").Header.Revision

	out := ctl(t, "", "compaction", strconv.FormatInt(r2, 10))
	if strings.TrimSpace(out) != fmt.Sprintf("compacted revision %d", r2) {
		t.Errorf("compaction output %q", out)
	}
	stderr := ctlFail(t, "", "get", "--rev="+strconv.FormatInt(r1, 10), p+"k")
	if !strings.Contains(stderr, "etcdserver: mvcc: required revision has been compacted") {
		t.Errorf("get at a compacted revision: stderr %q", stderr)
	}
	var get ctlGet
	ctlJSON(t, &get, "", "get", "--rev="+strconv.FormatInt(r2, 10), p+"k")
	if len(get.KVs) != 1 || string(get.KVs[0].Value) != "v2" {
		t.Errorf("get at the compaction revision: %+v", get.KVs)
	}
	stderr = ctlFail(t, "", "compaction", strconv.FormatInt(r2, 10))
	if !strings.Contains(stderr, "etcdserver: mvcc: required revision has been compacted") {
		t.Errorf("compacting again: stderr %q", stderr)
	}
	stderr = ctlFail(t, "", "compaction", strconv.FormatInt(r3+100, 10))
	if !strings.Contains(stderr, "etcdserver: mvcc: required revision is a future revision") {
		t.Errorf("compacting a future revision: stderr %q", stderr)
	}
	out = ctl(t, "", "compaction", "--physical", strconv.FormatInt(r3, 10))
	if strings.TrimSpace(out) != fmt.Sprintf("compacted revision %d", r3) {
		t.Errorf("physical compaction output %q", out)
	}
	ctlJSON(t, &get, "", "get", p+"k")
	if len(get.KVs) != 1 || get.KVs[0].Version != 3 || string(get.KVs[0].Value) != "v3" {
		t.Errorf("after compaction: %+v", get.KVs)
	}
}

// TestEtcdctlEndpointStatus checks `endpoint status` and `endpoint health`.
func TestEtcdctlEndpointStatus(t *testing.T) {
	s := shared(t)
	cli := sharedClient(t)
	rev := currentRev(t, cli)
	var sts []ctlEndpointStatus
	ctlJSON(t, &sts, "", "endpoint", "status")
	if len(sts) != 1 {
		t.Fatalf("endpoint status: %d entries, want 1", len(sts))
	}
	st := sts[0]
	if st.Endpoint != s.Endpoint() {
		t.Errorf("endpoint %q, want %q", st.Endpoint, s.Endpoint())
	}
	checkCtlHeader(t, "endpoint status", st.Status.Header, 0)
	if st.Status.Header.Revision < rev {
		t.Errorf("endpoint status revision %d < %d", st.Status.Header.Revision, rev)
	}
	if st.Status.Leader == 0 || st.Status.Leader != st.Status.Header.MemberID {
		t.Errorf("leader %d, want the member itself %d", st.Status.Leader, st.Status.Header.MemberID)
	}
	if st.Status.Version == "" || st.Status.DBSize <= 0 || st.Status.RaftIndex == 0 || st.Status.RaftTerm < 1 {
		t.Errorf("endpoint status %+v: want version, db size, raft index and term set", st.Status)
	}
	var hs []ctlHealth
	ctlJSON(t, &hs, "", "endpoint", "health")
	if len(hs) != 1 || !hs[0].Health || hs[0].Endpoint != s.Endpoint() {
		t.Errorf("endpoint health: %+v, want one healthy endpoint %s", hs, s.Endpoint())
	}
}

// TestEtcdctlMemberList checks `member list`.
func TestEtcdctlMemberList(t *testing.T) {
	s := shared(t)
	// Members publish their client URLs once they run (the mesh's, each on its own).
	var ml ctlMemberList
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		ml = ctlMemberList{}
		ctlJSON(t, &ml, "", "member", "list")
		published := true
		for _, m := range ml.Members {
			published = published && len(m.ClientURLs) > 0
		}
		if published || time.Now().After(deadline) {
			break
		}
	}
	checkCtlHeader(t, "member list", ml.Header, 0)
	want := 1
	if harness.Topology() == harness.TopologyMesh {
		want = 3 // the mesh's replicas; the first has the configured name
	}
	if len(ml.Members) != want {
		t.Fatalf("member list: %d members, want %d", len(ml.Members), want)
	}
	m := ml.Members[0]
	for _, o := range ml.Members {
		if o.Name == sharedName {
			m = o
		}
	}
	if m.ID == 0 || (want == 1 && m.ID != ml.Header.MemberID) {
		t.Errorf("member ID %d, want the header's member id %d", m.ID, ml.Header.MemberID)
	}
	if m.Name != sharedName {
		t.Errorf("member name %q, want %q", m.Name, sharedName)
	}
	found := false
	for _, u := range m.ClientURLs {
		if pu, err := url.Parse(u); err == nil && pu.Host == s.Endpoint() {
			found = true
		}
	}
	if !found {
		t.Errorf("client URLs %q do not include %s", m.ClientURLs, s.Endpoint())
	}
	out := ctl(t, "", "member", "list")
	if !strings.Contains(out, sharedName) || !strings.Contains(out, "started") {
		t.Errorf("member list (simple): %q, want the name and 'started'", out)
	}
}
