package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func mustPut(t *testing.T, cli *clientv3.Client, key, val string, opts ...clientv3.OpOption) *clientv3.PutResponse {
	t.Helper()
	resp, err := cli.Put(ctxT(t), key, val, opts...)
	requireOK(t, fmt.Sprintf("Put(%q)", key), err)
	return resp
}

func mustGet(t *testing.T, cli *clientv3.Client, key string, opts ...clientv3.OpOption) *clientv3.GetResponse {
	t.Helper()
	resp, err := cli.Get(ctxT(t), key, opts...)
	requireOK(t, fmt.Sprintf("Get(%q)", key), err)
	return resp
}

func mustDelete(t *testing.T, cli *clientv3.Client, key string, opts ...clientv3.OpOption) *clientv3.DeleteResponse {
	t.Helper()
	resp, err := cli.Delete(ctxT(t), key, opts...)
	requireOK(t, fmt.Sprintf("Delete(%q)", key), err)
	return resp
}

// checkHeader verifies a top-level response header: identity fields set,
// raft term at least 1 and, when wantRev > 0, the revision.
func checkHeader(t *testing.T, what string, h *pb.ResponseHeader, wantRev int64) {
	t.Helper()
	if h == nil {
		t.Fatalf("%s: response has no header", what)
	}
	if h.ClusterId == 0 || h.MemberId == 0 {
		t.Errorf("%s: header cluster_id=%d member_id=%d; both must be non-zero", what, h.ClusterId, h.MemberId)
	}
	if h.RaftTerm < 1 {
		t.Errorf("%s: header raft_term=%d, want >= 1", what, h.RaftTerm)
	}
	if wantRev > 0 && h.Revision != wantRev {
		t.Errorf("%s: header revision=%d, want %d", what, h.Revision, wantRev)
	}
}

// keysOf lists the keys of kvs with prefix removed.
func keysOf(kvs []*mvccpb.KeyValue, prefix string) []string {
	out := make([]string, 0, len(kvs))
	for _, kv := range kvs {
		out = append(out, strings.TrimPrefix(string(kv.Key), prefix))
	}
	return out
}

// fmtKVs renders key-values readably for failure messages.
func fmtKVs(kvs []*mvccpb.KeyValue) string {
	var b strings.Builder
	b.WriteString("[")
	for i, kv := range kvs {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "{%q=%q c%d m%d v%d l%d}", kv.Key, kv.Value, kv.CreateRevision, kv.ModRevision, kv.Version, kv.Lease)
	}
	b.WriteString("]")
	return b.String()
}

// expectKV checks one key-value's fields.
func expectKV(t *testing.T, what string, kv *mvccpb.KeyValue, key, val string, create, mod, version int64) {
	t.Helper()
	if kv == nil {
		t.Fatalf("%s: got no key-value, want %q=%q", what, key, val)
	}
	if string(kv.Key) != key || string(kv.Value) != val || kv.CreateRevision != create || kv.ModRevision != mod || kv.Version != version {
		t.Fatalf("%s: got %s, want {%q=%q c%d m%d v%d}", what, fmtKVs([]*mvccpb.KeyValue{kv}), key, val, create, mod, version)
	}
}

func equalStrings(a, b []string) bool { return slices.Equal(a, b) }

// grantLease grants a 300 s lease for tests that attach keys to one, revoked at the
// end of the test.
func grantLease(t *testing.T, cli *clientv3.Client) clientv3.LeaseID {
	t.Helper()
	lease, err := cli.Grant(ctxT(t), 300)
	requireOK(t, "Grant", err)
	t.Cleanup(func() { _, _ = cli.Revoke(context.Background(), lease.ID) })
	return lease.ID
}
