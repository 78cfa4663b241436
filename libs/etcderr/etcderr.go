// Package etcderr holds the errors kvmesh answers with, each with etcd's gRPC code and
// etcd's exact message: clients such as clientv3 recognise errors by their message text
// (go.etcd.io/etcd/api/v3/v3rpc/rpctypes), so these strings are part of the API.
package etcderr

import (
	"context"
	"errors"

	"connectrpc.com/connect"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is an etcd API error: a code and a fixed message.
type Error struct {
	code connect.Code
	msg  string
}

// known are the errors below by code and message: what arrives from the wire becomes
// the same value again (FromWire), so the system tells errors apart with errors.Is.
var known = map[wireKey]*Error{}

type wireKey struct {
	code connect.Code
	msg  string
}

func newError(code connect.Code, msg string) *Error {
	e := &Error{code: code, msg: msg}
	known[wireKey{code, msg}] = e
	return e
}

// FromWire is the typed error for a code and message that came over the wire: one of
// the errors below when it is one of them (errors.Is works across the network), else
// an *Error with that code and message. The conversion happens once, where the
// message arrives; nothing after it compares strings.
func FromWire(code connect.Code, msg string) error {
	if e := known[wireKey{code, msg}]; e != nil {
		return e
	}
	return &Error{code: code, msg: msg}
}

// CodeOf is the code a client would see for err (see CodeMessage).
func CodeOf(err error) connect.Code {
	code, _ := CodeMessage(err)
	return code
}

func (e *Error) Error() string { return e.msg }

// Code is the gRPC/Connect status code clients see.
func (e *Error) Code() connect.Code { return e.code }

// The errors of etcd's rpctypes package that kvmesh answers with.
var (
	ErrEmptyKey          = newError(connect.CodeInvalidArgument, "etcdserver: key is not provided")
	ErrKeyNotFound       = newError(connect.CodeInvalidArgument, "etcdserver: key not found")
	ErrValueProvided     = newError(connect.CodeInvalidArgument, "etcdserver: value is provided")
	ErrLeaseProvided     = newError(connect.CodeInvalidArgument, "etcdserver: lease is provided")
	ErrTooManyOps        = newError(connect.CodeInvalidArgument, "etcdserver: too many operations in txn request")
	ErrDuplicateKey      = newError(connect.CodeInvalidArgument, "etcdserver: duplicate key given in txn request")
	ErrInvalidSortOption = newError(connect.CodeInvalidArgument, "etcdserver: invalid sort option")
	ErrCompacted         = newError(connect.CodeOutOfRange, "etcdserver: mvcc: required revision has been compacted")
	ErrFutureRev         = newError(connect.CodeOutOfRange, "etcdserver: mvcc: required revision is a future revision")
	ErrNoSpace           = newError(connect.CodeResourceExhausted, "etcdserver: mvcc: database space exceeded")

	ErrLeaseNotFound    = newError(connect.CodeNotFound, "etcdserver: requested lease not found")
	ErrLeaseExist       = newError(connect.CodeFailedPrecondition, "etcdserver: lease already exists")
	ErrLeaseTTLTooLarge = newError(connect.CodeOutOfRange, "etcdserver: too large lease TTL")

	ErrMemberExist            = newError(connect.CodeFailedPrecondition, "etcdserver: member ID already exist")
	ErrPeerURLExist           = newError(connect.CodeFailedPrecondition, "etcdserver: Peer URLs already exists")
	ErrMemberNotEnoughStarted = newError(connect.CodeFailedPrecondition, "etcdserver: re-configuration failed due to not enough started members")
	ErrMemberBadURLs          = newError(connect.CodeInvalidArgument, "etcdserver: given member URLs are invalid")
	ErrMemberNotFound         = newError(connect.CodeNotFound, "etcdserver: member not found")
	ErrMemberNotLearner       = newError(connect.CodeFailedPrecondition, "etcdserver: can only promote a learner member")
	ErrLearnerNotReady        = newError(connect.CodeFailedPrecondition, "etcdserver: can only promote a learner member which is in sync with leader")
	ErrTooManyLearners        = newError(connect.CodeFailedPrecondition, "etcdserver: too many learner members in cluster")
	ErrBadLeaderTransferee    = newError(connect.CodeFailedPrecondition, "etcdserver: bad leader transferee")

	ErrRequestTooLarge        = newError(connect.CodeInvalidArgument, "etcdserver: request is too large")
	ErrRequestTooManyRequests = newError(connect.CodeResourceExhausted, "etcdserver: too many requests")

	// ErrCorrupt refuses writes while a member's CORRUPT alarm is active.
	ErrCorrupt = newError(connect.CodeDataLoss, "etcdserver: corrupt cluster")

	ErrWrongDowngradeVersionFormat   = newError(connect.CodeInvalidArgument, "etcdserver: wrong downgrade target version format")
	ErrInvalidDowngradeTargetVersion = newError(connect.CodeInvalidArgument, "etcdserver: invalid downgrade target version")

	ErrNoLeader                   = newError(connect.CodeUnavailable, "etcdserver: no leader")
	ErrNotLeader                  = newError(connect.CodeFailedPrecondition, "etcdserver: not leader")
	ErrLeaderChanged              = newError(connect.CodeUnavailable, "etcdserver: leader changed")
	ErrStopped                    = newError(connect.CodeUnavailable, "etcdserver: server stopped")
	ErrTimeout                    = newError(connect.CodeUnavailable, "etcdserver: request timed out")
	ErrTimeoutDueToLeaderFail     = newError(connect.CodeUnavailable, "etcdserver: request timed out, possibly due to previous leader failure")
	ErrTimeoutDueToConnectionLost = newError(connect.CodeUnavailable, "etcdserver: request timed out, possibly due to connection lost")
	ErrTimeoutLeaderTransfer      = newError(connect.CodeUnavailable, "etcdserver: request timed out, leader transfer took too long")
	ErrTimeoutWaitAppliedIndex    = newError(connect.CodeUnavailable, "etcdserver: request timed out, waiting for the applied index took too long")
	ErrUnhealthy                  = newError(connect.CodeUnavailable, "etcdserver: unhealthy cluster")
	ErrNotSupportedForLearner     = newError(connect.CodeFailedPrecondition, "etcdserver: rpc not supported for learner")

	ErrRootUserNotExist     = newError(connect.CodeFailedPrecondition, "etcdserver: root user does not exist")
	ErrRootRoleNotExist     = newError(connect.CodeFailedPrecondition, "etcdserver: root user does not have root role")
	ErrUserAlreadyExist     = newError(connect.CodeFailedPrecondition, "etcdserver: user name already exists")
	ErrUserEmpty            = newError(connect.CodeInvalidArgument, "etcdserver: user name is empty")
	ErrUserNotFound         = newError(connect.CodeFailedPrecondition, "etcdserver: user name not found")
	ErrRoleAlreadyExist     = newError(connect.CodeFailedPrecondition, "etcdserver: role name already exists")
	ErrRoleNotFound         = newError(connect.CodeFailedPrecondition, "etcdserver: role name not found")
	ErrRoleEmpty            = newError(connect.CodeInvalidArgument, "etcdserver: role name is empty")
	ErrAuthFailed           = newError(connect.CodeInvalidArgument, "etcdserver: authentication failed, invalid user ID or password")
	ErrPermissionNotGiven   = newError(connect.CodeInvalidArgument, "etcdserver: permission not given")
	ErrPermissionDenied     = newError(connect.CodePermissionDenied, "etcdserver: permission denied")
	ErrRoleNotGranted       = newError(connect.CodeFailedPrecondition, "etcdserver: role is not granted to the user")
	ErrPermissionNotGranted = newError(connect.CodeFailedPrecondition, "etcdserver: permission is not granted to the role")
	ErrAuthNotEnabled       = newError(connect.CodeFailedPrecondition, "etcdserver: authentication is not enabled")
	ErrInvalidAuthToken     = newError(connect.CodeUnauthenticated, "etcdserver: invalid auth token")
	ErrInvalidAuthMgmt      = newError(connect.CodeInvalidArgument, "etcdserver: invalid auth management")
	ErrAuthOldRevision      = newError(connect.CodeInvalidArgument, "etcdserver: revision of auth store is old")
	// ErrNoPasswordUser is not one of rpctypes' errors: etcd answers it as Unknown
	// with the auth package's own message.
	ErrNoPasswordUser = newError(connect.CodeUnknown, "auth: authentication failed, password was given for no password user")
	// ErrAuthStale is kvmesh's own, between a gateway and a replica: the auth state the
	// gateway checked a request with is no longer the replica's. The request changed
	// nothing; the gateway refreshes its copy and decides again. Clients never see it.
	ErrAuthStale = newError(connect.CodeAborted, "kvmesh: auth state changed")
	// ErrTooManyAuthFailures is kvmesh's own: Authenticate is refused for a while after
	// repeated failures for the same user or from the same address.
	ErrTooManyAuthFailures = newError(connect.CodeResourceExhausted, "etcdserver: too many failed authentication attempts, retry later")

	ErrCanceled         = newError(connect.CodeCanceled, "etcdserver: request canceled")
	ErrDeadlineExceeded = newError(connect.CodeDeadlineExceeded, "etcdserver: context deadline exceeded")
)

// CodeMessage is what a client sees for err: etcd errors keep their code and message,
// context errors become etcd's canceled/deadline errors, errors that already carry a
// Connect or gRPC code (for example from an internal call) keep it, and anything else
// is Unknown, as gRPC reports unexpected errors.
func CodeMessage(err error) (connect.Code, string) {
	var ee *Error
	var ce *connect.Error
	switch {
	case errors.As(err, &ee):
		return ee.code, ee.msg
	case errors.As(err, &ce):
		return ce.Code(), ce.Message()
	case errors.Is(err, context.Canceled):
		return ErrCanceled.code, ErrCanceled.msg
	case errors.Is(err, context.DeadlineExceeded):
		return ErrDeadlineExceeded.code, ErrDeadlineExceeded.msg
	}
	if s, ok := status.FromError(err); ok {
		return connect.Code(s.Code()), s.Message()
	}
	return connect.CodeUnknown, err.Error()
}

// ToConnect turns any error into the error a Connect handler returns (see
// CodeMessage). A new error is made each time, so an upstream response's metadata never
// leaks into ours.
func ToConnect(err error) error {
	if err == nil {
		return nil
	}
	code, msg := CodeMessage(err)
	return connect.NewError(code, errors.New(msg))
}

// ToGRPC turns any error into the status error a grpc-go handler returns (see
// CodeMessage). Connect's codes are gRPC's codes.
func ToGRPC(err error) error {
	if err == nil {
		return nil
	}
	code, msg := CodeMessage(err)
	return status.Error(codes.Code(code), msg)
}
