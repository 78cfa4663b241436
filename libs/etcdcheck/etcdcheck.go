// Package etcdcheck is etcd's gRPC-layer request validation, shared by replicas
// (before anything is proposed) and gateways (before auth decisions, which etcd makes
// after validation).
package etcdcheck

import (
	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// The checks are etcd's gRPC-layer request validation: they run before a request
// is proposed, and give the same errors in the same order as etcd.

func RangeRequest(r *pb.RangeRequest) error {
	if len(r.GetKey()) == 0 {
		return etcderr.ErrEmptyKey
	}
	if _, ok := pb.RangeRequest_SortOrder_name[int32(r.GetSortOrder())]; !ok {
		return etcderr.ErrInvalidSortOption
	}
	if _, ok := pb.RangeRequest_SortTarget_name[int32(r.GetSortTarget())]; !ok {
		return etcderr.ErrInvalidSortOption
	}
	return nil
}

func PutRequest(r *pb.PutRequest) error {
	switch {
	case len(r.GetKey()) == 0:
		return etcderr.ErrEmptyKey
	case r.GetIgnoreValue() && len(r.GetValue()) != 0:
		return etcderr.ErrValueProvided
	case r.GetIgnoreLease() && r.GetLease() != 0:
		return etcderr.ErrLeaseProvided
	}
	return nil
}

func TxnRequest(r *pb.TxnRequest, maxOps int) error {
	opc := max(len(r.GetCompare()), len(r.GetSuccess()), len(r.GetFailure()))
	if opc > maxOps {
		return etcderr.ErrTooManyOps
	}
	for _, c := range r.GetCompare() {
		if len(c.GetKey()) == 0 {
			return etcderr.ErrEmptyKey
		}
	}
	for _, ops := range [][]*pb.RequestOp{r.GetSuccess(), r.GetFailure()} {
		for _, op := range ops {
			if err := checkRequestOp(op, maxOps-opc); err != nil {
				return err
			}
		}
	}
	return nil
}

func checkRequestOp(op *pb.RequestOp, maxOps int) error {
	switch req := op.GetRequest().(type) {
	case *pb.RequestOp_RequestRange:
		return RangeRequest(req.RequestRange)
	case *pb.RequestOp_RequestPut:
		return PutRequest(req.RequestPut)
	case *pb.RequestOp_RequestDeleteRange:
		if len(req.RequestDeleteRange.GetKey()) == 0 {
			return etcderr.ErrEmptyKey
		}
		return nil
	case *pb.RequestOp_RequestTxn:
		return TxnRequest(req.RequestTxn, maxOps)
	}
	// An op with nothing set.
	return etcderr.ErrKeyNotFound
}

// checkTxnIntervals rejects a txn whose branches could write one key twice.
func TxnIntervals(r *pb.TxnRequest) error {
	if _, _, err := txnIntervals(r.GetSuccess()); err != nil {
		return err
	}
	_, _, err := txnIntervals(r.GetFailure())
	return err
}

// interval is a deleted key range [begin, end); an empty end is unbounded. This is
// etcd's interval semantics, where only the empty string is infinity: a delete with
// range_end "\x00" covers no key here, exactly as in etcd.
type interval struct{ begin, end string }

type intervals []interval

func (s intervals) covers(key string) bool {
	for _, iv := range s {
		if iv.begin <= key && (iv.end == "" || key < iv.end) {
			return true
		}
	}
	return false
}

// txnIntervals returns the keys put and the ranges deleted by ops (nested txns
// included), failing when a put overlaps another put or a delete.
func txnIntervals(ops []*pb.RequestOp) (map[string]struct{}, intervals, error) {
	var dels intervals
	for _, op := range ops {
		d := op.GetRequestDeleteRange()
		if d == nil {
			continue
		}
		if len(d.GetRangeEnd()) != 0 {
			dels = append(dels, interval{string(d.GetKey()), string(d.GetRangeEnd())})
		} else {
			dels = append(dels, interval{string(d.GetKey()), string(d.GetKey()) + "\x00"})
		}
	}
	puts := make(map[string]struct{})
	for _, op := range ops {
		t := op.GetRequestTxn()
		if t == nil {
			continue
		}
		putsThen, delsThen, err := txnIntervals(t.GetSuccess())
		if err != nil {
			return nil, dels, err
		}
		putsElse, delsElse, err := txnIntervals(t.GetFailure())
		if err != nil {
			return nil, dels, err
		}
		for k := range putsThen {
			if _, dup := puts[k]; dup || dels.covers(k) {
				return nil, dels, etcderr.ErrDuplicateKey
			}
			puts[k] = struct{}{}
		}
		for k := range putsElse {
			if _, dup := puts[k]; dup {
				// then and else are exclusive: the same key in both is fine.
				if _, safe := putsThen[k]; !safe {
					return nil, dels, etcderr.ErrDuplicateKey
				}
			}
			if dels.covers(k) {
				return nil, dels, etcderr.ErrDuplicateKey
			}
			puts[k] = struct{}{}
		}
		dels = append(dels, delsThen...)
		dels = append(dels, delsElse...)
	}
	for _, op := range ops {
		p := op.GetRequestPut()
		if p == nil {
			continue
		}
		k := string(p.GetKey())
		if _, dup := puts[k]; dup || dels.covers(k) {
			return nil, dels, etcderr.ErrDuplicateKey
		}
		puts[k] = struct{}{}
	}
	return puts, dels, nil
}
