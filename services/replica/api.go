package replica

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/raft/v3"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcdcheck"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/health"
	"github.com/kvmesh/kvmesh/services/replica/mvcc"
)

// kvService serves etcd's KV operations to gateways. It validates requests exactly as
// etcd's gRPC layer does before anything reaches Raft.
type kvService struct {
	replicav1.UnimplementedKVServiceServer
	r *Replica
}

func (s *kvService) Range(ctx context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	m := req
	if err := etcdcheck.RangeRequest(m); err != nil {
		return nil, err
	}
	if err := s.r.serving(m.GetSerializable()); err != nil {
		return nil, err
	}
	if !m.GetSerializable() {
		if err := s.r.read.linearizable(ctx); err != nil {
			return nil, err
		}
	}
	st := s.r.acquire()
	resp, err := st.kv.Range(ctx, m)
	st.release()
	if err == nil {
		err = s.r.checkRead(ctx)
	}
	if err != nil {
		return nil, err
	}
	s.r.header(resp.Header)
	return resp, nil
}

func (s *kvService) Put(ctx context.Context, req *pb.PutRequest) (*pb.PutResponse, error) {
	if err := s.r.serving(false); err != nil {
		return nil, err
	}
	if err := etcdcheck.PutRequest(req); err != nil {
		return nil, err
	}
	if err := s.r.checkQuota(putCost(req)); err != nil {
		return nil, err
	}
	resp, err := s.r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_Put{Put: req}})
	if err != nil {
		return nil, err
	}
	out := resp.(*pb.PutResponse)
	s.r.header(out.Header)
	return out, nil
}

func (s *kvService) DeleteRange(ctx context.Context, req *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	if err := s.r.serving(false); err != nil {
		return nil, err
	}
	if len(req.GetKey()) == 0 {
		return nil, etcderr.ErrEmptyKey
	}
	resp, err := s.r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_DeleteRange{DeleteRange: req}})
	if err != nil {
		return nil, err
	}
	out := resp.(*pb.DeleteRangeResponse)
	s.r.header(out.Header)
	return out, nil
}

func (s *kvService) Txn(ctx context.Context, req *pb.TxnRequest) (*pb.TxnResponse, error) {
	if err := s.r.serving(false); err != nil {
		return nil, err
	}
	m := req
	if err := etcdcheck.TxnRequest(m, s.r.cfg.MaxTxnOps); err != nil {
		return nil, err
	}
	if err := etcdcheck.TxnIntervals(m); err != nil {
		return nil, err
	}
	var out *pb.TxnResponse
	if mvcc.IsTxnReadOnly(m) {
		if !mvcc.IsTxnSerializable(m) {
			if err := s.r.read.linearizable(ctx); err != nil {
				return nil, err
			}
		}
		st := s.r.acquire()
		resp, err := st.kv.ReadTxn(ctx, m)
		st.release()
		if err == nil {
			err = s.r.checkRead(ctx)
		}
		if err != nil {
			return nil, err
		}
		out = resp
	} else {
		if err := s.r.checkQuota(txnCost(m)); err != nil {
			return nil, err
		}
		resp, err := s.r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_Txn{Txn: m}})
		if err != nil {
			return nil, err
		}
		out = resp.(*pb.TxnResponse)
	}
	s.r.header(out.Header)
	return out, nil
}

func (s *kvService) Compact(ctx context.Context, req *pb.CompactionRequest) (*pb.CompactionResponse, error) {
	if err := s.r.serving(false); err != nil {
		return nil, err
	}
	resp, err := s.r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_Compaction{Compaction: req}})
	if err != nil {
		return nil, err
	}
	if req.GetPhysical() {
		st := s.r.acquire()
		err := st.kv.WaitCompacted(ctx, req.GetRevision())
		st.release()
		if err != nil {
			return nil, err
		}
	}
	out := resp.(*pb.CompactionResponse)
	s.r.header(out.Header)
	return out, nil
}

type clusterService struct {
	replicav1.UnimplementedClusterServiceServer
	r *Replica
}

func (s *clusterService) MemberList(ctx context.Context, req *pb.MemberListRequest) (*pb.MemberListResponse, error) {
	if err := s.r.serving(false); err != nil {
		return nil, err
	}
	if req.GetLinearizable() {
		if err := s.r.read.linearizable(ctx); err != nil {
			return nil, err
		}
	}
	resp := &pb.MemberListResponse{Header: s.r.header(&pb.ResponseHeader{Revision: s.r.rev()}), Members: s.r.members.list()}
	return resp, nil
}

type maintenanceService struct {
	replicav1.UnimplementedMaintenanceServiceServer
	r *Replica
}

// serverVersion is the etcd version whose API kvmesh serves; tools compare it to
// decide which features they may use.
const serverVersion = "3.6.0"

func (s *maintenanceService) Status(ctx context.Context, req *pb.StatusRequest) (*pb.StatusResponse, error) {
	r := s.r
	st := r.node.Status()
	size, inUse := r.dbSizes()
	resp := &pb.StatusResponse{
		Header:           r.header(&pb.ResponseHeader{Revision: r.rev()}),
		Version:          serverVersion,
		DbSize:           size,
		DbSizeInUse:      inUse,
		Leader:           st.Lead,
		RaftIndex:        st.GetCommit(),
		RaftTerm:         st.GetTerm(),
		RaftAppliedIndex: r.applied.Load(),
		StorageVersion:   serverVersion,
		DbSizeQuota:      max(r.quotaBytes(), 0),
		DowngradeInfo:    &pb.DowngradeInfo{},
	}
	if m := r.members.get(r.id); m != nil {
		resp.IsLearner = m.GetIsLearner()
	}
	if st.Lead == raft.None {
		resp.Errors = append(resp.Errors, etcderr.ErrNoLeader.Error())
	}
	for _, a := range r.alarms.all() {
		resp.Errors = append(resp.Errors, fmt.Sprintf("memberID:%d alarm:%s", a.GetMemberID(), a.GetAlarm()))
	}
	return resp, nil
}

func (s *maintenanceService) HashKV(ctx context.Context, req *pb.HashKVRequest) (*pb.HashKVResponse, error) {
	if err := s.r.serving(false); err != nil {
		return nil, err
	}
	st := s.r.acquire()
	hash, rev, compact, err := st.kv.HashKV(ctx, req.GetRevision())
	st.release()
	if err != nil {
		return nil, err
	}
	return &pb.HashKVResponse{
		Header:          s.r.header(&pb.ResponseHeader{Revision: s.r.rev()}),
		Hash:            hash,
		CompactRevision: compact,
		HashRevision:    rev,
	}, nil
}

// Hash hashes the whole key history (etcd hashes its whole backend; kvmesh's members
// agree on the key history, which is what the hash is compared for).
func (s *maintenanceService) Hash(ctx context.Context, req *pb.HashRequest) (*pb.HashResponse, error) {
	if err := s.r.serving(false); err != nil {
		return nil, err
	}
	st := s.r.acquire()
	hash, rev, _, err := st.kv.HashKV(ctx, 0)
	st.release()
	if err != nil {
		return nil, err
	}
	return &pb.HashResponse{Header: s.r.header(&pb.ResponseHeader{Revision: rev}), Hash: hash}, nil
}

// healthRead is the read etcd's health checks make: one key, serializable (local) or
// linearizable (through a ReadIndex round), with etcd's errors.
func (r *Replica) healthRead(ctx context.Context, serializable bool) error {
	return health.Read(ctx, func(ctx context.Context) error {
		_, err := (&kvService{r: r}).Range(ctx, &pb.RangeRequest{Key: []byte("health"), KeysOnly: true, Limit: 1, Serializable: serializable})
		return err
	})
}

// healthEndpoints are /health, /livez and /readyz with etcd's checks.
func (r *Replica) healthEndpoints() *health.Endpoints {
	e := health.New(r.log, r.tel.Registry)
	e.Health(func(ctx context.Context, serializable bool) (string, bool) {
		if !serializable && r.leader.Load() == raft.None {
			return "RAFT NO LEADER", false
		}
		if err := r.healthRead(ctx, serializable); err != nil {
			return "RANGE ERROR:" + err.Error(), false
		}
		return "", true
	})
	serializable := func(ctx context.Context) error { return r.healthRead(ctx, true) }
	e.Live("serializable_read", serializable)
	e.Ready("data_corruption", func(context.Context) error {
		if r.alarms.active(pb.AlarmType_CORRUPT) {
			return errors.New("alarm activated: CORRUPT")
		}
		return nil
	})
	e.Ready("serializable_read", serializable)
	e.Ready("linearizable_read", func(ctx context.Context) error { return r.healthRead(ctx, false) })
	e.Ready("non_learner", func(context.Context) error {
		if r.isLearner() {
			return errors.New("not supported for learner")
		}
		return nil
	})
	return e
}
