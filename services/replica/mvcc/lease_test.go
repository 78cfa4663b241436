package mvcc

import (
	"errors"
	"slices"
	"testing"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

func leaseKeyNames(s *Store, id int64) []string {
	var out []string
	for _, k := range s.LeaseKeys(id) {
		out = append(out, string(k))
	}
	return out
}

// Put with a lease attaches, put with ignore_lease keeps, put without a lease
// detaches; revoking deletes exactly the lease's keys, in one revision, in key order.
func TestLeaseAttachAndRevoke(t *testing.T) {
	e := newEnv(t)
	if _, err := e.apply(&pb.LeaseGrantRequest{ID: 7, TTL: 30}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.apply(&pb.LeaseGrantRequest{ID: 7, TTL: 5}); !errors.Is(err, etcderr.ErrLeaseExist) {
		t.Fatalf("granting an existing lease: %v", err)
	}
	rev0 := e.s.Rev()
	if _, err := e.put(&pb.PutRequest{Key: []byte("x"), Value: []byte("v"), Lease: 8}); !errors.Is(err, etcderr.ErrLeaseNotFound) {
		t.Fatalf("put with an unknown lease: %v", err)
	}
	if e.s.Rev() != rev0 {
		t.Fatal("a failed put moved the revision")
	}
	for _, k := range []string{"c", "a", "b"} {
		if _, err := e.put(&pb.PutRequest{Key: []byte(k), Value: []byte("v"), Lease: 7}); err != nil {
			t.Fatal(err)
		}
	}
	e.mustPut("d", "v")
	if _, err := e.put(&pb.PutRequest{Key: []byte("b"), Value: []byte("w")}); err != nil { // detaches
		t.Fatal(err)
	}
	if _, err := e.put(&pb.PutRequest{Key: []byte("a"), Value: []byte("w"), IgnoreLease: true}); err != nil { // keeps
		t.Fatal(err)
	}
	if got := leaseKeyNames(e.s, 7); !slices.Equal(got, []string{"a", "c"}) {
		t.Fatalf("lease 7 holds %q", got)
	}
	if kv := e.get("a", 0); kv.GetLease() != 7 {
		t.Fatalf("a after an ignore_lease put: %v", kv)
	}
	before := e.s.Rev()
	resp, err := e.apply(&pb.LeaseRevokeRequest{ID: 7})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.(*pb.LeaseRevokeResponse).GetHeader().GetRevision(); got != before+1 || e.s.Rev() != before+1 {
		t.Fatalf("revoke answered revision %d, store at %d; want %d", got, e.s.Rev(), before+1)
	}
	changes, _, err := e.s.Changes(t.Context(), before+1, 1<<20, true)
	if err != nil {
		t.Fatal(err)
	}
	var deleted []string
	for _, ev := range changes[0].Events {
		if ev.Type != mvccpb.Event_DELETE {
			t.Fatalf("revoke wrote %v", ev)
		}
		deleted = append(deleted, string(ev.Kv.Key))
	}
	if !slices.Equal(deleted, []string{"a", "c"}) {
		t.Fatalf("revoke deleted %q", deleted)
	}
	if e.get("b", 0) == nil || e.get("d", 0) == nil || e.get("a", 0) != nil {
		t.Fatal("revoke deleted the wrong keys")
	}
	if _, ok := e.s.Lease(7); ok {
		t.Fatal("the revoked lease still exists")
	}
	if _, err := e.apply(&pb.LeaseRevokeRequest{ID: 7}); !errors.Is(err, etcderr.ErrLeaseNotFound) {
		t.Fatalf("revoking a revoked lease: %v", err)
	}
	// A lease without keys: revoking it writes no revision.
	e.apply(&pb.LeaseGrantRequest{ID: 9, TTL: 30})
	rev := e.s.Rev()
	if resp, err := e.apply(&pb.LeaseRevokeRequest{ID: 9}); err != nil || resp.(*pb.LeaseRevokeResponse).GetHeader().GetRevision() != rev || e.s.Rev() != rev {
		t.Fatalf("revoking an empty lease: %v, %v; store at %d, want %d", resp, err, e.s.Rev(), rev)
	}
}

// Grants, attachments and revokes inside one batch see each other.
func TestLeaseWithinOneBatch(t *testing.T) {
	e := newEnv(t)
	e.mustPut("k", "old")
	res := e.applyBatch(
		&pb.LeaseGrantRequest{ID: 3, TTL: 10},
		&pb.PutRequest{Key: []byte("k"), Value: []byte("v"), Lease: 3},
		&pb.PutRequest{Key: []byte("n"), Value: []byte("v"), Lease: 3},
		&pb.LeaseRevokeRequest{ID: 3},
		&pb.PutRequest{Key: []byte("z"), Value: []byte("v"), Lease: 3},
	)
	for i, r := range res[:4] {
		if r.err != nil {
			t.Fatalf("request %d: %v", i, r.err)
		}
	}
	if !errors.Is(res[4].err, etcderr.ErrLeaseNotFound) {
		t.Fatalf("put with the lease revoked earlier in the batch: %v", res[4].err)
	}
	if e.get("k", 0) != nil || e.get("n", 0) != nil {
		t.Fatal("the batch's revoke left its keys")
	}
	if len(e.s.Leases()) != 0 {
		t.Fatalf("leases after the batch: %v", e.s.Leases())
	}
}

// The table, the keys' attachments and checkpoints survive a restart.
func TestLeaseRestart(t *testing.T) {
	e := newEnv(t)
	e.apply(&pb.LeaseGrantRequest{ID: 1, TTL: 60})
	e.apply(&pb.LeaseGrantRequest{ID: 2, TTL: 5})
	for _, k := range []string{"p", "q"} {
		if _, err := e.put(&pb.PutRequest{Key: []byte(k), Value: []byte("v"), Lease: 2}); err != nil {
			t.Fatal(err)
		}
	}
	b := e.db.NewIndexedBatch()
	w := e.s.NewWriter(b)
	if err := w.LeaseCheckpoint(1, 42); err != nil {
		t.Fatal(err)
	}
	if err := w.LeaseCheckpoint(99, 1); err != nil { // unknown: ignored
		t.Fatal(err)
	}
	if err := e.s.Commit(w, e.commit); err != nil {
		t.Fatal(err)
	}
	e.restart()
	want := []Lease{{ID: 1, TTL: 60, Remaining: 42}, {ID: 2, TTL: 5}}
	if got := e.s.Leases(); !slices.Equal(got, want) {
		t.Fatalf("after restart: %v, want %v", got, want)
	}
	if got := leaseKeyNames(e.s, 2); !slices.Equal(got, []string{"p", "q"}) {
		t.Fatalf("lease 2 holds %q after restart", got)
	}
	if _, err := e.apply(&pb.LeaseRevokeRequest{ID: 2}); err != nil {
		t.Fatal(err)
	}
	if e.get("p", 0) != nil || e.get("q", 0) != nil {
		t.Fatal("revoke after restart left keys")
	}
}
