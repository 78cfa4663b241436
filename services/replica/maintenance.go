package replica

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/grpc"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/services/replica/mvcc"
	"github.com/kvmesh/kvmesh/services/replica/snapfile"
)

// The operator's half of etcd's Maintenance on a replica: defragmentation and
// snapshots (backups, and restoring one into a new cluster).

var discardLogger = slog.New(slog.DiscardHandler)

// keySpace bounds every key of the state and Raft databases (their keys start with an
// ASCII letter).
var keySpace = [2][]byte{{0x00}, {0xff}}

// Defragment compacts the state and Raft databases whole, dropping the versions a
// compaction deleted and the deleted keys, which gives their space back (etcd rewrites
// its bbolt file). Reads and writes go on meanwhile.
func (s *maintenanceService) Defragment(ctx context.Context, _ *pb.DefragmentRequest) (*pb.DefragmentResponse, error) {
	r := s.r
	start := time.Now()
	before, _ := r.dbSizes()
	st := r.acquire()
	err := compactAll(ctx, st.db)
	st.release()
	if err == nil {
		err = compactAll(ctx, r.raftDB)
	}
	if err != nil {
		r.log.Warn("defragmentation failed", "err", err)
		return nil, err
	}
	r.dbSizeAt.Store(0) // measure again at the next quota check
	after, _ := r.dbSizes()
	r.m.defrags.Inc()
	r.log.Info("defragmented", "db_size_before", before, "db_size_after", after, "took", time.Since(start))
	return &pb.DefragmentResponse{}, nil
}

func compactAll(ctx context.Context, db *pebble.DB) error {
	if err := db.Flush(); err != nil {
		return err
	}
	return db.Compact(ctx, keySpace[0], keySpace[1], true)
}

// snapshotChunk is the size of the blobs a snapshot is streamed in (etcd's).
const snapshotChunk = 32 << 10

// Snapshot streams a snapshot file of this replica's state (package snapfile) as
// etcd streams its database: blobs with the bytes remaining after each, then one blob
// of the SHA-256 of all before it.
func (s *maintenanceService) Snapshot(req *pb.SnapshotRequest, stream grpc.ServerStreamingServer[pb.SnapshotResponse]) error {
	return s.serveSnapshot(stream.Context(), stream.Send)
}

func (s *maintenanceService) serveSnapshot(ctx context.Context, send func(*pb.SnapshotResponse) error) error {
	r := s.r
	if err := r.serving(true); err != nil {
		return err
	}
	// Written whole first, so the size is known and the state is released at once;
	// read back and removed (a leftover of a crash mid-stream is removed at the next
	// start, see currentStateDir). It is never kept, so it is not synced.
	f, err := os.CreateTemp(r.cfg.DataDir, "snap-send-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	meta, size, err := r.writeSnapshot(f)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		return err
	}
	body := size - sha256.Size
	var sent int64
	for sent < body {
		blob := make([]byte, min(snapshotChunk, body-sent))
		if _, err := io.ReadFull(f, blob); err != nil {
			return err
		}
		sent += int64(len(blob))
		if err := send(&pb.SnapshotResponse{RemainingBytes: uint64(body - sent), Blob: blob, Version: serverVersion}); err != nil {
			return err
		}
	}
	sum := make([]byte, sha256.Size)
	if _, err := io.ReadFull(f, sum); err != nil {
		return err
	}
	if err := send(&pb.SnapshotResponse{Blob: sum, Version: serverVersion}); err != nil {
		return err
	}
	r.m.snapshotsSaved.Inc()
	r.log.Info("sent a snapshot", "revision", meta.Revision, "bytes", size)
	return nil
}

// saveSnapshot writes a snapshot file to path durably: written beside it, synced,
// renamed over it, the directory synced.
func (r *Replica) saveSnapshot(path string) (snapfile.Meta, int64, error) {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return snapfile.Meta{}, 0, err
	}
	meta, size, err := r.writeSnapshot(f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		os.Remove(tmp)
		return snapfile.Meta{}, 0, err
	}
	return meta, size, nil
}

// writeSnapshot writes the state machine, as of one moment (a Pebble snapshot: writes
// go on meanwhile), to w as a snapshot file, and returns its meta and size.
func (r *Replica) writeSnapshot(w io.Writer) (snapfile.Meta, int64, error) {
	st := r.acquire() // held until the end: a snapshot install closes the database it replaces
	defer st.release()
	ps := st.db.NewSnapshot()
	defer ps.Close()
	pos, err := loadApplied(ps)
	if err != nil {
		return snapfile.Meta{}, 0, err
	}
	stats, err := mvcc.ReadStats(ps)
	if err != nil {
		return snapfile.Meta{}, 0, err
	}
	sw := snapfile.NewWriter(w)
	it, err := ps.NewIter(nil)
	if err != nil {
		return snapfile.Meta{}, 0, err
	}
	for it.First(); it.Valid(); it.Next() {
		if err := sw.Add(it.Key(), it.Value()); err != nil {
			it.Close()
			return snapfile.Meta{}, 0, err
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return snapfile.Meta{}, 0, err
	}
	return sw.Close(snapfile.Meta{
		Version: serverVersion, Revision: stats.Rev, CompactRevision: stats.CompactRev, TotalKey: stats.Keys,
		RaftIndex: pos.index, RaftTerm: pos.term, MemberID: r.id, ClusterID: r.clusterID,
	})
}

// Restore builds the data directory of a member of a new cluster from a snapshot file:
// the keys with their whole history and revision, the leases (their clocks restart
// with their whole TTL, as etcd's restore), users, roles and namespaces. Membership,
// the applied Raft position and alarms are left behind: the member starts a new
// cluster from its configuration (KVMESH_REPLICA_INITIAL_CLUSTER, _CLUSTER_TOKEN,
// _PEER_URLS), with new IDs. Every member of the new cluster is restored from the same
// file. A damaged file is refused before anything is written, and dataDir must not
// exist or be empty.
func Restore(file, dataDir string) (snapfile.Meta, error) {
	if dataDir == "" {
		return snapfile.Meta{}, errors.New("restore: the data directory is not set")
	}
	if ents, err := os.ReadDir(dataDir); err == nil && len(ents) > 0 {
		return snapfile.Meta{}, fmt.Errorf("restore: %s is not empty; restore into a new data directory", dataDir)
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return snapfile.Meta{}, fmt.Errorf("restore: %w", err)
	}
	if _, err := snapfile.Verify(file); err != nil {
		return snapfile.Meta{}, fmt.Errorf("restore %s: %w", file, err)
	}
	// Built beside the target and renamed into place: a failure leaves nothing.
	parent := filepath.Dir(filepath.Clean(dataDir))
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return snapfile.Meta{}, err
	}
	stage, err := os.MkdirTemp(parent, "."+filepath.Base(dataDir)+".restore-")
	if err != nil {
		return snapfile.Meta{}, err
	}
	defer os.RemoveAll(stage)
	meta, err := restoreState(file, filepath.Join(stage, stateDirInit))
	if err != nil {
		return snapfile.Meta{}, fmt.Errorf("restore %s: %w", file, err)
	}
	if err := writeStateFile(stage, stateDirInit); err != nil {
		return snapfile.Meta{}, err
	}
	os.Remove(dataDir) // empty, if it exists
	if err := os.Rename(stage, dataDir); err != nil {
		return snapfile.Meta{}, err
	}
	return meta, syncDir(parent)
}

// restoreState writes the snapshot's pairs, but for the member-specific ones, into a
// new state database in dir.
func restoreState(file, dir string) (snapfile.Meta, error) {
	opts := statePebbleOptions(discardLogger)
	opts.DisableWAL = true // flushed below before it counts
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return snapfile.Meta{}, err
	}
	defer func() {
		if db != nil {
			db.Close()
		}
	}()
	b := db.NewBatch()
	meta, err := snapfile.Read(file, func(k, v []byte) error {
		if memberSpecific(k) {
			return nil
		}
		if err := b.Set(k, v, nil); err != nil {
			return err
		}
		if b.Len() >= 4<<20 {
			if err := b.Commit(pebble.NoSync); err != nil {
				return err
			}
			b.Reset()
		}
		return nil
	})
	if err == nil {
		err = b.Commit(pebble.NoSync)
	}
	b.Close()
	if err == nil {
		err = mvcc.RestartLeaseClocks(db)
	}
	if err == nil {
		err = db.Flush()
	}
	if err != nil {
		return snapfile.Meta{}, err
	}
	err = db.Close()
	db = nil
	return meta, err
}

// memberSpecific tells the state database's keys that belong to the member and cluster
// a snapshot was taken on, not to the data: the applied Raft position, the
// configuration, the members, and the alarms.
func memberSpecific(k []byte) bool {
	for _, p := range [][]byte{appliedKey, confStateKey, memberPrefix, removedKey, alarmKey} {
		if bytes.HasPrefix(k, p) {
			return true
		}
	}
	return false
}

// SnapshotStatus verifies a snapshot file and describes it (etcdutl snapshot status).
func SnapshotStatus(file string) (snapfile.Meta, int64, error) {
	meta, err := snapfile.Verify(file)
	if err != nil {
		return meta, 0, err
	}
	fi, err := os.Stat(file)
	if err != nil {
		return meta, 0, err
	}
	return meta, fi.Size(), nil
}
