package etcderr

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestCodeMessage(t *testing.T) {
	cases := []struct {
		name    string
		err     error
		code    connect.Code
		message string
	}{
		{"etcd error", ErrCompacted, connect.CodeOutOfRange, "etcdserver: mvcc: required revision has been compacted"},
		{"wrapped etcd error", fmt.Errorf("txn range: %w", ErrFutureRev), connect.CodeOutOfRange, "etcdserver: mvcc: required revision is a future revision"},
		{"connect error from a replica", connect.NewError(connect.CodeInvalidArgument, errors.New("etcdserver: key is not provided")), connect.CodeInvalidArgument, "etcdserver: key is not provided"},
		{"grpc status", status.Error(codes.Unavailable, "etcdserver: no leader"), connect.CodeUnavailable, "etcdserver: no leader"},
		{"canceled", context.Canceled, connect.CodeCanceled, "etcdserver: request canceled"},
		{"deadline", fmt.Errorf("wait: %w", context.DeadlineExceeded), connect.CodeDeadlineExceeded, "etcdserver: context deadline exceeded"},
		{"anything else", errors.New("disk on fire"), connect.CodeUnknown, "disk on fire"},
	}
	for _, c := range cases {
		code, msg := CodeMessage(c.err)
		if code != c.code || msg != c.message {
			t.Errorf("%s: got %v %q, want %v %q", c.name, code, msg, c.code, c.message)
		}
		if s := status.Convert(ToGRPC(c.err)); s.Code() != codes.Code(c.code) || s.Message() != c.message {
			t.Errorf("%s: ToGRPC gave %v %q", c.name, s.Code(), s.Message())
		}
		var ce *connect.Error
		if !errors.As(ToConnect(c.err), &ce) || ce.Code() != c.code || ce.Message() != c.message {
			t.Errorf("%s: ToConnect gave %v", c.name, ToConnect(c.err))
		}
	}
	if ToConnect(nil) != nil || ToGRPC(nil) != nil {
		t.Error("nil error converted to non-nil")
	}
}

func TestFromWireGivesTheSameErrorBack(t *testing.T) {
	for _, want := range []*Error{ErrCompacted, ErrAuthStale, ErrNotSupportedForLearner, ErrNoLeader} {
		code, msg := CodeMessage(ToGRPC(want))
		if got := FromWire(code, msg); !errors.Is(got, want) {
			t.Errorf("FromWire(%v, %q) = %v, not the same error", code, msg, got)
		}
	}
	// A message that is not one of etcd's keeps its code and text, typed.
	got := FromWire(connect.CodeUnavailable, "kvmesh: something else")
	if errors.Is(got, ErrNoLeader) || CodeOf(got) != connect.CodeUnavailable || got.Error() != "kvmesh: something else" {
		t.Errorf("FromWire of an unknown message = %v (%v)", got, CodeOf(got))
	}
	// The same message with another code is not the error.
	if errors.Is(FromWire(connect.CodeInternal, ErrNoLeader.Error()), ErrNoLeader) {
		t.Error("FromWire matched a message under another code")
	}
}
