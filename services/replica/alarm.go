package replica

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// Alarms and the backend quota, as etcd's.
//
// The active alarms (member ID, NOSPACE or CORRUPT) are replicated state: raised and
// cleared through Raft (AlarmRequest entries), kept in the state database beside the
// data, so every member refuses the same entries. While a NOSPACE alarm is active,
// apply refuses puts, txns with puts and lease grants (etcd's applierV3Capped); while a
// CORRUPT alarm is, every write (applierV3Corrupt). Reads, deletes, compaction,
// defragmentation and snapshots go on, which is how an operator gets space back.
//
// The quota (KVMESH_REPLICA_QUOTA_BACKEND_BYTES) is checked where a write arrives,
// before it is proposed: when the state database's size plus the write's cost reaches
// it, the member raises NOSPACE for itself and refuses the write.

var alarmKey = []byte("Aalarm") // replicav1.AlarmState, in the state database

// alarmTable holds the active alarms. Apply replaces the list (copy on write); readers
// load it without a lock.
type alarmTable struct {
	cur atomic.Pointer[[]*pb.AlarmMember]
}

func loadAlarms(db pebble.Reader) ([]*pb.AlarmMember, error) {
	v, closer, err := db.Get(alarmKey)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer closer.Close()
	st := &replicav1.AlarmState{}
	if err := proto.Unmarshal(v, st); err != nil {
		return nil, fmt.Errorf("decode alarms: %w", err)
	}
	return st.GetAlarms(), nil
}

func (t *alarmTable) install(l []*pb.AlarmMember) { t.cur.Store(&l) }

func (t *alarmTable) all() []*pb.AlarmMember {
	if p := t.cur.Load(); p != nil {
		return *p
	}
	return nil
}

// list returns the active alarms of one type (NONE: all), as etcd's AlarmStore.Get.
func (t *alarmTable) list(typ pb.AlarmType) []*pb.AlarmMember {
	var out []*pb.AlarmMember
	for _, a := range t.all() {
		if typ == pb.AlarmType_NONE || a.GetAlarm() == typ {
			out = append(out, &pb.AlarmMember{MemberID: a.GetMemberID(), Alarm: a.GetAlarm()})
		}
	}
	return out
}

func (t *alarmTable) active(typ pb.AlarmType) bool {
	for _, a := range t.all() {
		if a.GetAlarm() == typ {
			return true
		}
	}
	return false
}

// refuses is apply's alarm check of an entry.
func (t *alarmTable) refuses(req *replicav1.RaftRequest) error {
	if len(t.all()) == 0 {
		return nil
	}
	if t.active(pb.AlarmType_CORRUPT) {
		switch req.GetRequest().(type) {
		// Every write; a read-only txn is never proposed.
		case *replicav1.RaftRequest_Put, *replicav1.RaftRequest_DeleteRange, *replicav1.RaftRequest_Txn,
			*replicav1.RaftRequest_Compaction, *replicav1.RaftRequest_LeaseGrant, *replicav1.RaftRequest_LeaseRevoke:
			return etcderr.ErrCorrupt
		}
	}
	if t.active(pb.AlarmType_NOSPACE) && writeCost(req) > 0 {
		return etcderr.ErrNoSpace
	}
	return nil
}

// writeCost is what a request adds to the database by etcd's measure (quota.go): a put
// costs its key and value and 256 bytes of overhead, a txn its costlier branch, a lease
// grant 64 bytes; everything else nothing.
func writeCost(req *replicav1.RaftRequest) int64 {
	switch op := req.GetRequest().(type) {
	case *replicav1.RaftRequest_Put:
		return putCost(op.Put)
	case *replicav1.RaftRequest_Txn:
		return txnCost(op.Txn)
	case *replicav1.RaftRequest_LeaseGrant:
		return leaseGrantCost
	}
	return 0
}

const (
	putOverheadCost = 256
	leaseGrantCost  = 64
)

func putCost(p *pb.PutRequest) int64 {
	return putOverheadCost + int64(len(p.GetKey())+len(p.GetValue()))
}

func txnCost(t *pb.TxnRequest) int64 {
	branch := func(ops []*pb.RequestOp) int64 {
		var c int64
		for _, op := range ops {
			switch o := op.GetRequest().(type) {
			case *pb.RequestOp_RequestPut:
				c += putCost(o.RequestPut)
			case *pb.RequestOp_RequestTxn:
				c += txnCost(o.RequestTxn)
			}
		}
		return c
	}
	return max(branch(t.GetSuccess()), branch(t.GetFailure()))
}

// applyAlarm applies an AlarmRequest entry into the batch.
func (r *Replica) applyAlarm(b *pebble.Batch, ar *pb.AlarmRequest) result {
	cur := r.alarms.all()
	m := &pb.AlarmMember{MemberID: ar.GetMemberID(), Alarm: ar.GetAlarm()}
	i, found := slices.BinarySearchFunc(cur, m, compareAlarms)
	resp := &pb.AlarmResponse{}
	var next []*pb.AlarmMember
	switch ar.GetAction() {
	case pb.AlarmRequest_ACTIVATE:
		if ar.GetAlarm() == pb.AlarmType_NONE {
			return result{resp: resp} // nothing to raise (etcd 3.6+)
		}
		resp.Alarms = []*pb.AlarmMember{m}
		if found {
			return result{resp: resp}
		}
		next = slices.Insert(slices.Clone(cur), i, m)
		r.log.Warn("alarm raised", "member_id", fmt.Sprintf("%x", m.GetMemberID()), "alarm", m.GetAlarm().String())
	case pb.AlarmRequest_DEACTIVATE:
		if !found {
			return result{resp: resp}
		}
		resp.Alarms = []*pb.AlarmMember{m}
		next = slices.Delete(slices.Clone(cur), i, i+1)
		r.log.Info("alarm cleared", "member_id", fmt.Sprintf("%x", m.GetMemberID()), "alarm", m.GetAlarm().String())
	default:
		return result{err: errUnknownAlarmAction}
	}
	v, err := proto.Marshal(&replicav1.AlarmState{Alarms: next})
	if err != nil {
		return result{err: err}
	}
	if err := b.Set(alarmKey, v, nil); err != nil {
		return result{err: err}
	}
	r.alarms.install(next)
	return result{resp: resp}
}

func compareAlarms(a, b *pb.AlarmMember) int {
	return cmp.Or(cmp.Compare(a.GetMemberID(), b.GetMemberID()), cmp.Compare(a.GetAlarm(), b.GetAlarm()))
}

var errUnknownAlarmAction = etcderr.FromWire(connect.CodeInvalidArgument, "etcdserver: unknown alarm action")

// Alarm serves etcd's Maintenance.Alarm: GET from this member's applied state after a
// linearizable read (so an alarm another member raised is seen), ACTIVATE and
// DEACTIVATE through Raft.
func (s *maintenanceService) Alarm(ctx context.Context, req *pb.AlarmRequest) (*pb.AlarmResponse, error) {
	r := s.r
	switch req.GetAction() {
	case pb.AlarmRequest_GET:
		if err := r.serving(false); err != nil {
			return nil, err
		}
		if err := r.read.linearizable(ctx); err != nil {
			return nil, err
		}
		return &pb.AlarmResponse{Header: r.header(&pb.ResponseHeader{Revision: r.rev()}), Alarms: r.alarms.list(req.GetAlarm())}, nil
	case pb.AlarmRequest_ACTIVATE, pb.AlarmRequest_DEACTIVATE:
		if err := r.serving(false); err != nil {
			return nil, err
		}
		resp, err := r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_Alarm{Alarm: req}})
		if err != nil {
			return nil, err
		}
		out := resp.(*pb.AlarmResponse)
		out.Header = r.header(&pb.ResponseHeader{Revision: r.rev()})
		return out, nil
	}
	return nil, errUnknownAlarmAction
}

// checkQuota refuses a write of the given cost while NOSPACE is active, and raises
// NOSPACE for this member (refusing the write) when the write would take the state
// database to the quota (etcd's quotaKVServer).
func (r *Replica) checkQuota(cost int64) error {
	if cost == 0 || r.quotaBytes() <= 0 {
		return nil
	}
	if r.alarms.active(pb.AlarmType_NOSPACE) {
		return etcderr.ErrNoSpace
	}
	size := r.dbSizeRecent()
	if size+cost < r.quotaBytes() {
		r.dbSizeSince.Add(cost)
		return nil
	}
	r.log.Warn("database size reached the backend quota; raising the NOSPACE alarm", "db_size", size, "quota", r.quotaBytes())
	if err := r.raiseAlarm(context.Background(), pb.AlarmType_NOSPACE); err != nil {
		r.log.Warn("raising the NOSPACE alarm failed", "err", err)
	}
	return etcderr.ErrNoSpace
}

// quotaBytes is the backend quota: etcd's default 2 GiB when unset, none when negative.
func (r *Replica) quotaBytes() int64 {
	if r.cfg.QuotaBackendBytes == 0 {
		return defaultQuotaBytes
	}
	return r.cfg.QuotaBackendBytes
}

// defaultQuotaBytes is etcd's default backend quota.
const defaultQuotaBytes = 2 << 30

// dbSizeRecent is the state database's size for the quota check: as measured at most
// dbSizeMaxAge ago, plus the cost of the writes admitted since (Pebble's metrics are
// not free, and writes can fill megabytes between two measures).
func (r *Replica) dbSizeRecent() int64 {
	now := time.Now().UnixNano()
	if at := r.dbSizeAt.Load(); now-at < int64(dbSizeMaxAge) {
		return r.dbSizeLast.Load() + r.dbSizeSince.Load()
	}
	size := r.dbSize()
	r.dbSizeLast.Store(size)
	r.dbSizeSince.Store(0)
	r.dbSizeAt.Store(now)
	return size
}

const dbSizeMaxAge = 100 * time.Millisecond
