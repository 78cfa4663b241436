package raftlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// Before the write-ahead log, kvmesh kept the Raft log in Pebble under these keys.
var (
	legacyEntryPrefix  = []byte("Rl") // + big-endian index → raftpb.Entry
	legacyHardStateKey = []byte("Rh") // → raftpb.HardState
	legacySnapshotKey  = []byte("Rs") // → raftpb.SnapshotMetadata of the last truncation
	legacyKeys         = [2][]byte{[]byte("R"), []byte("S")}
)

// ImportPebble moves a Raft log that an earlier kvmesh kept in db (keys starting with
// 'R') into a new log in dir, then deletes those keys. It does nothing when db holds
// none. The new log is written beside dir and renamed into place, so a crash leaves
// either the old log or the whole new one.
func ImportPebble(db *pebble.DB, dir string, opts Options) error {
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: legacyKeys[0], UpperBound: legacyKeys[1]})
	if err != nil {
		return err
	}
	found := it.First()
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return fmt.Errorf("raftlog: import: %w", err)
	}
	if !found {
		return nil
	}
	if _, err := fsOf(opts).Stat(dir); err != nil {
		if err := importPebble(db, dir, opts); err != nil {
			return fmt.Errorf("raftlog: import the log kept in Pebble: %w", err)
		}
	}
	// Imported (now or before a crash): the old keys go.
	return db.DeleteRange(legacyKeys[0], legacyKeys[1], pebble.Sync)
}

func importPebble(db *pebble.DB, dir string, opts Options) error {
	fs := fsOf(opts)
	hs, meta := &pb.HardState{}, &pb.SnapshotMetadata{}
	if err := getProto(db, legacyHardStateKey, hs); err != nil {
		return err
	}
	if err := getProto(db, legacySnapshotKey, meta); err != nil {
		return err
	}
	tmp := dir + ".import"
	if err := fs.RemoveAll(tmp); err != nil {
		return err
	}
	s, err := Open(tmp, opts)
	if err != nil {
		return err
	}
	defer s.Close()
	if meta.GetIndex() > 0 {
		if err := s.ApplySnapshot(meta); err != nil {
			return err
		}
	}
	lo := binary.BigEndian.AppendUint64(append([]byte(nil), legacyEntryPrefix...), meta.GetIndex()+1)
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: []byte("Rm")})
	if err != nil {
		return err
	}
	defer it.Close()
	var batch []*pb.Entry
	flush := func() error {
		err := s.Save(nil, batch, true)
		batch = batch[:0]
		return err
	}
	for it.SeekGE(lo); it.Valid(); it.Next() {
		if len(it.Key()) != len(legacyEntryPrefix)+8 || string(it.Key()[:2]) != string(legacyEntryPrefix) {
			continue
		}
		e := &pb.Entry{}
		if err := proto.Unmarshal(it.Value(), e); err != nil {
			return err
		}
		if batch = append(batch, e); len(batch) == 256 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := it.Error(); err != nil {
		return err
	}
	if len(batch) > 0 {
		if err := flush(); err != nil {
			return err
		}
	}
	if err := s.Save(hs, nil, true); err != nil {
		return err
	}
	if err := s.Close(); err != nil {
		return err
	}
	if err := fs.Rename(tmp, dir); err != nil {
		return err
	}
	return syncDir(fs, filepath.Dir(dir))
}

func fsOf(opts Options) vfs.FS {
	if opts.FS == nil {
		return vfs.Default
	}
	return opts.FS
}

func getProto(db *pebble.DB, key []byte, m proto.Message) error {
	v, closer, err := db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer closer.Close()
	return proto.Unmarshal(v, m)
}
