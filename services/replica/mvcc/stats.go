package mvcc

import (
	"encoding/binary"
	"errors"

	"github.com/cockroachdb/pebble/v2"
)

// Stats summarizes a store as one reader (a database or a snapshot of it) sees it.
type Stats struct {
	Rev        int64 // current revision
	CompactRev int64 // last compaction's revision, -1 when none
	Keys       int64 // live keys
}

// ReadStats reads the store's revisions and counts its live keys.
func ReadStats(r pebble.Reader) (Stats, error) {
	st := Stats{Rev: 1, CompactRev: -1}
	for _, m := range []struct {
		key []byte
		to  *int64
	}{{metaRevKey, &st.Rev}, {metaCompactKey, &st.CompactRev}} {
		v, closer, err := r.Get(m.key)
		if errors.Is(err, pebble.ErrNotFound) {
			continue
		}
		if err != nil {
			return st, err
		}
		*m.to = decodeInt(v)
		closer.Close()
	}
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixCurrent}, UpperBound: []byte{prefixCurrent + 1}})
	if err != nil {
		return st, err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		st.Keys++
	}
	return st, it.Error()
}

// RestartLeaseClocks clears every lease's checkpointed remaining TTL in db, so that
// each gets its whole TTL again when a leader starts its clock (etcd restores leases
// from a snapshot with their granted TTL). The caller makes the change durable.
func RestartLeaseClocks(db *pebble.DB) error {
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixLease}, UpperBound: []byte{prefixLease + 1}})
	if err != nil {
		return err
	}
	defer it.Close()
	b := db.NewBatch()
	defer b.Close()
	for it.First(); it.Valid(); it.Next() {
		v := it.Value()
		if len(v) != 16 || binary.BigEndian.Uint64(v[8:]) == 0 {
			continue
		}
		if err := b.Set(it.Key(), encodeLease(Lease{TTL: int64(binary.BigEndian.Uint64(v))}), nil); err != nil {
			return err
		}
	}
	if err := it.Error(); err != nil {
		return err
	}
	return b.Commit(pebble.NoSync) // the caller flushes
}
