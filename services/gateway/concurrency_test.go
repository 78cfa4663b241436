package gateway

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"connectrpc.com/connect"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// The keys of locks and campaigns are clientv3/concurrency's: "%s%x" of the prefix and
// the lease, negative leases included.
func TestSessionKey(t *testing.T) {
	for _, lease := range []int64{0x1b59, 1, -1, -255, 0x7fffffffffffffff} {
		want := fmt.Sprintf("%s%x", "db/", lease)
		if got := string(sessionKey([]byte("db/"), lease)); got != want {
			t.Errorf("lease %d: %q, want %q", lease, got, want)
		}
	}
	pfx := []byte("db/")
	sessionKey(pfx, 0x10)
	if string(pfx) != "db/" {
		t.Fatalf("sessionKey changed its prefix: %q", pfx)
	}
}

// A failed step answers as etcd's recipes do: the step's message with code Unknown;
// a missing leader and the caller's own context keep their codes.
func TestRecipeErr(t *testing.T) {
	cases := []struct {
		err  error
		code connect.Code
		msg  string
	}{
		{etcderr.ErrPermissionDenied, connect.CodeUnknown, "etcdserver: permission denied"},
		{etcderr.ErrLeaseNotFound, connect.CodeUnknown, "etcdserver: requested lease not found"},
		{etcderr.ErrEmptyKey, connect.CodeUnknown, "etcdserver: key is not provided"},
		{etcderr.ErrNoLeader, connect.CodeUnavailable, "etcdserver: no leader"},
		{context.Canceled, connect.CodeCanceled, "etcdserver: request canceled"},
		{errElectionNotLeader, connect.CodeUnknown, "election: not leader"},
	}
	for _, c := range cases {
		code, msg := etcderr.CodeMessage(recipeErr(c.err))
		if code != c.code || msg != c.msg {
			t.Errorf("%v: %v %q, want %v %q", c.err, code, msg, c.code, c.msg)
		}
	}
	if recipeErr(nil) != nil {
		t.Fatal("recipeErr(nil) is not nil")
	}
}

// A canceled watch inside a recipe ends it with clientv3's WatchResponse.Err.
func TestWatchCancelErr(t *testing.T) {
	cases := []struct {
		resp *pb.WatchResponse
		want error
	}{
		{&pb.WatchResponse{Canceled: true, CompactRevision: 5}, etcderr.ErrCompacted},
		{&pb.WatchResponse{Canceled: true, CancelReason: "etcdserver: permission denied"}, errors.New("etcdserver: permission denied")},
		{&pb.WatchResponse{Canceled: true}, etcderr.ErrFutureRev},
	}
	for _, c := range cases {
		if got := watchCancelErr(c.resp); got.Error() != c.want.Error() {
			t.Errorf("%v: %v, want %v", c.resp, got, c.want)
		}
	}
}
