package authz

import pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"

// CheckTxn is etcd's checkTxnPermission: every compare is a read; every op of both
// branches, at every nesting level, is checked as its own request would be. The lease
// part of puts is left to replicas (CheckLeaseKeys).
func (s *Store) CheckTxn(ai *Info, t *pb.TxnRequest) error {
	for _, c := range t.GetCompare() {
		if err := s.IsRangePermitted(ai, c.GetKey(), c.GetRangeEnd()); err != nil {
			return err
		}
	}
	if err := s.checkOps(ai, t.GetSuccess()); err != nil {
		return err
	}
	return s.checkOps(ai, t.GetFailure())
}

func (s *Store) checkOps(ai *Info, ops []*pb.RequestOp) error {
	for _, op := range ops {
		var err error
		switch o := op.GetRequest().(type) {
		case *pb.RequestOp_RequestRange:
			if o.RequestRange != nil {
				err = s.IsRangePermitted(ai, o.RequestRange.GetKey(), o.RequestRange.GetRangeEnd())
			}
		case *pb.RequestOp_RequestPut:
			if p := o.RequestPut; p != nil {
				err = s.CheckPut(ai, p.GetKey(), p.GetPrevKv())
			}
		case *pb.RequestOp_RequestDeleteRange:
			if d := o.RequestDeleteRange; d != nil {
				// etcd checks the prev_kv read before the delete here.
				if d.GetPrevKv() {
					err = s.IsRangePermitted(ai, d.GetKey(), d.GetRangeEnd())
				}
				if err == nil {
					err = s.IsDeleteRangePermitted(ai, d.GetKey(), d.GetRangeEnd())
				}
			}
		case *pb.RequestOp_RequestTxn:
			if o.RequestTxn != nil {
				err = s.CheckTxn(ai, o.RequestTxn)
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// TxnPutLeases lists the leases the puts of a txn attach keys to, at every level.
func TxnPutLeases(t *pb.TxnRequest, out []int64) []int64 {
	for _, ops := range [][]*pb.RequestOp{t.GetSuccess(), t.GetFailure()} {
		for _, op := range ops {
			switch o := op.GetRequest().(type) {
			case *pb.RequestOp_RequestPut:
				if id := o.RequestPut.GetLease(); id != 0 {
					out = append(out, id)
				}
			case *pb.RequestOp_RequestTxn:
				out = TxnPutLeases(o.RequestTxn, out)
			}
		}
	}
	return out
}
