package gateway

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"connectrpc.com/connect"
	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
)

// The operator's half of etcd's Maintenance: alarms, defragmentation, snapshots and
// downgrades, through a gateway that stands for the whole cluster.

// Alarm lists, raises or clears alarms (etcd 3.6+: listing needs a user, changing them
// an admin). Alarms are cluster state: the leader answers.
func (g *Gateway) Alarm(ctx context.Context, r *pb.AlarmRequest) (*pb.AlarmResponse, error) {
	chk := admin
	if r.GetAction() == pb.AlarmRequest_GET {
		chk = requireInfo
	}
	return authorized(ctx, g, chk, func(ctx context.Context) (*pb.AlarmResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.Alarm, r)
	})
}

// Defragment defragments every voter, one after another (what `etcdctl defrag
// --cluster` does member by member with etcd): a gateway stands for the cluster, and a
// member left undefragmented keeps its space.
func (g *Gateway) Defragment(ctx context.Context, r *pb.DefragmentRequest) (*pb.DefragmentResponse, error) {
	return authorized(ctx, g, admin, func(ctx context.Context) (*pb.DefragmentResponse, error) {
		var errs []error
		order := g.view.forWrite()
		if len(order) == 0 {
			return nil, etcderr.ErrNoLeader
		}
		for _, c := range order {
			if _, err := c.api.Defragment(ctx, r); err != nil {
				errs = append(errs, fmt.Errorf("replica %s: %w", c.url, err))
			}
		}
		if len(errs) > 0 {
			return nil, errors.Join(errs...)
		}
		return &pb.DefragmentResponse{}, nil
	})
}

// snapshot streams a snapshot of the leader's state (admin only, as etcd). Another
// replica is tried only while nothing was sent.
func (g *Gateway) snapshot(ctx context.Context, r *pb.SnapshotRequest, send func(*pb.SnapshotResponse) error) error {
	_, err := authorized(ctx, g, admin, func(ctx context.Context) (*struct{}, error) {
		err := error(etcderr.ErrNoLeader)
		for _, c := range g.view.forWrite() {
			sent := false
			err = c.api.Snapshot(ctx, r, func(m *pb.SnapshotResponse) error {
				sent = true
				return send(m)
			})
			if err == nil || sent || !replicaapi.IsNotSent(err) {
				break
			}
			g.view.markDown(c)
		}
		return nil, err
	})
	return err
}

func (s maintenanceServer) Snapshot(r *pb.SnapshotRequest, stream pb.Maintenance_SnapshotServer) error {
	return s.snapshot(stream.Context(), r, stream.Send)
}

// clusterVersion is the etcd cluster version kvmesh speaks (its servers' "3.6.0").
const clusterVersion = "3.6"

// Downgrade answers etcd's downgrade requests. kvmesh's storage is its own and has no
// earlier etcd version to go back to, so no target is valid: a malformed target gets
// etcd's format error, any other etcd's invalid-target error (both InvalidArgument),
// and CANCEL succeeds, there being nothing in progress (as etcd answers it).
func (g *Gateway) Downgrade(ctx context.Context, r *pb.DowngradeRequest) (*pb.DowngradeResponse, error) {
	return authorized(ctx, g, admin, func(ctx context.Context) (*pb.DowngradeResponse, error) {
		resp := &pb.DowngradeResponse{Header: &pb.ResponseHeader{ClusterId: g.view.clusterID(), Revision: g.seen()}, Version: clusterVersion}
		switch r.GetAction() {
		case pb.DowngradeRequest_VALIDATE, pb.DowngradeRequest_ENABLE:
			if !validVersion(r.GetVersion()) {
				return nil, etcderr.ErrWrongDowngradeVersionFormat
			}
			return nil, etcderr.ErrInvalidDowngradeTargetVersion
		case pb.DowngradeRequest_CANCEL:
			return resp, nil
		}
		return nil, etcderr.FromWire(connect.CodeInvalidArgument, "etcdserver: unknown downgrade action")
	})
}

// validVersion tells a semantic version etcd's downgrade accepts: major.minor or
// major.minor.patch.
func validVersion(v string) bool {
	parts := strings.Split(v, ".")
	if len(parts) < 2 || len(parts) > 3 {
		return false
	}
	for _, p := range parts {
		if _, err := strconv.ParseUint(p, 10, 32); err != nil {
			return false
		}
	}
	return true
}
