package replica

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"os"
	"path/filepath"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/cockroachdb/pebble/v2"
	"go.etcd.io/raft/v3"
	raftpb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	peerv1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/peer/v1"
	"github.com/kvmesh/kvmesh/api/gen/kvmesh/peer/v1/peerv1connect"
)

// Snapshots.
//
// Raft asks for a snapshot when a follower needs entries the log no longer has. The
// snapshot raft's storage returns describes the log's truncation point only; the
// sender replaces it with the state machine as it is at that moment: a Pebble snapshot
// of the state database, whose applied index, term and configuration (stored in the
// same database, written in the same batches as the data) become the message's
// metadata. That index is committed and at least the truncation point, so the leader's
// progress for the follower moves past it as soon as the follower acknowledges.
//
// The receiver writes the pairs into a new database in a directory of its own, flushes
// it, and only then steps the MsgSnap into Raft. When Raft hands the snapshot back in a
// Ready, the apply loop installs it: STATE is atomically pointed at the new directory,
// the state is swapped in memory, and the log is reset to the snapshot. A crash before
// the STATE rename leaves the old state (the staged directory is removed at start); a
// crash after it, before the log reset, is repaired at start by reconcileLog.

// snapshotChunkBytes is roughly how much data one streamed chunk carries.
const snapshotChunkBytes = 1 << 20

// snapshots tracks snapshot transfers of this replica.
type snapshots struct {
	recv sync.Mutex // one snapshot received at a time

	mu       sync.Mutex
	incoming *incomingSnap // received and handed to Raft, not installed yet
	sending  map[uint64]bool

	wg sync.WaitGroup // senders and closers of replaced states
}

type incomingSnap struct {
	index uint64
	dir   string
}

func (s *snapshots) wait() { s.wg.Wait() }

// offer records a received snapshot, discarding an older one Raft never asked for.
func (s *snapshots) offer(in *incomingSnap) {
	s.mu.Lock()
	old := s.incoming
	s.incoming = in
	s.mu.Unlock()
	if old != nil {
		os.RemoveAll(old.dir)
	}
}

// take hands the received snapshot at index to the installer.
func (s *snapshots) take(index uint64) *incomingSnap {
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.incoming
	if in == nil || in.index != index {
		return nil
	}
	s.incoming = nil
	return in
}

// sendSnapshot streams the state machine to the member m is addressed to, then tells
// Raft how it went.
func (t *transport) sendSnapshot(m *raftpb.Message) {
	r := t.r
	to := m.GetTo()
	r.snaps.mu.Lock()
	if r.snaps.sending == nil {
		r.snaps.sending = make(map[uint64]bool)
	}
	busy := r.snaps.sending[to]
	r.snaps.sending[to] = true
	r.snaps.mu.Unlock()
	if busy {
		return // the transfer in flight reports for this one too
	}
	s := t.sender(to)
	if s == nil {
		r.snaps.mu.Lock()
		delete(r.snaps.sending, to)
		r.snaps.mu.Unlock()
		r.node.ReportSnapshot(to, raft.SnapshotFailure)
		return
	}
	r.snaps.wg.Add(1)
	go func() {
		defer r.snaps.wg.Done()
		start := time.Now()
		n, index, err := t.streamSnapshot(s, m)
		r.snaps.mu.Lock()
		delete(r.snaps.sending, to)
		r.snaps.mu.Unlock()
		if err != nil {
			r.log.Warn("sending snapshot failed", "to", fmt.Sprintf("%x", to), "err", err)
			r.node.ReportSnapshot(to, raft.SnapshotFailure)
			return
		}
		r.m.snapshotsSent.Inc()
		r.log.Info("sent snapshot", "to", fmt.Sprintf("%x", to), "index", index, "pairs", n, "took", time.Since(start))
		r.node.ReportSnapshot(to, raft.SnapshotFinish)
	}()
}

func (t *transport) streamSnapshot(s *peerSender, m *raftpb.Message) (n, index uint64, err error) {
	r := t.r
	st := r.acquire()
	defer st.release()
	ps := st.db.NewSnapshot()
	defer ps.Close()
	pos, err := loadApplied(ps)
	if err != nil {
		return 0, 0, err
	}
	members, err := loadMembers(ps)
	if err != nil {
		return 0, 0, err
	}
	msg := proto.Clone(m).(*raftpb.Message)
	msg.Snapshot = &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{
		Index: proto.Uint64(pos.index), Term: proto.Uint64(pos.term), ConfState: members.conf}}
	enc, err := proto.Marshal(msg)
	if err != nil {
		return 0, 0, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-r.stopc:
			cancel()
		case <-ctx.Done():
		}
	}()
	client := peerv1connect.NewPeerServiceClient(t.client, s.url, r.tel.InternalClient()...)
	stream := client.Snapshot(ctx)
	chunk := &peerv1.SnapshotChunk{ClusterId: r.clusterID, From: r.id, Message: enc}
	size := 0
	it, err := ps.NewIter(nil)
	if err != nil {
		return 0, 0, err
	}
	defer it.Close()
	sum := newPairHash()
	for it.First(); it.Valid(); it.Next() {
		sum.add(it.Key(), it.Value())
		chunk.Keys = append(chunk.Keys, append([]byte(nil), it.Key()...))
		chunk.Values = append(chunk.Values, append([]byte(nil), it.Value()...))
		n++
		size += len(it.Key()) + len(it.Value())
		if size >= snapshotChunkBytes {
			if err := stream.Send(chunk); err != nil {
				_, rerr := stream.CloseAndReceive()
				return 0, 0, errors.Join(err, rerr)
			}
			chunk, size = &peerv1.SnapshotChunk{}, 0
		}
	}
	if err := it.Error(); err != nil {
		return 0, 0, err
	}
	chunk.Last, chunk.Total, chunk.Sha256 = true, n, sum.sum()
	if err := stream.Send(chunk); err != nil {
		_, rerr := stream.CloseAndReceive()
		return 0, 0, errors.Join(err, rerr)
	}
	if _, err := stream.CloseAndReceive(); err != nil {
		return 0, 0, err
	}
	return n, pos.index, nil
}

// Snapshot receives a streamed snapshot (see the comment at the top of this file).
func (s *peerService) Snapshot(ctx context.Context, stream *connect.ClientStream[peerv1.SnapshotChunk]) (*connect.Response[peerv1.SnapshotResponse], error) {
	r := s.r
	if r.peers.isolated.Load() {
		return nil, connect.NewError(connect.CodeUnavailable, errIsolated)
	}
	if !r.snaps.recv.TryLock() {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("a snapshot is already being received"))
	}
	defer r.snaps.recv.Unlock()
	if !stream.Receive() {
		if err := stream.Err(); err != nil {
			return nil, err
		}
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("empty snapshot stream"))
	}
	first := stream.Msg()
	if first.GetClusterId() != r.clusterID {
		return nil, connect.NewError(connect.CodeFailedPrecondition, errClusterIDMismatch)
	}
	m := &raftpb.Message{}
	if err := proto.Unmarshal(first.GetMessage(), m); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	if m.GetType() != raftpb.MessageType_MsgSnap || m.GetTo() != r.id || raft.IsEmptySnap(m.GetSnapshot()) {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("first snapshot chunk must carry a MsgSnap for this member"))
	}
	index := m.GetSnapshot().GetMetadata().GetIndex()
	start := time.Now()
	dir := filepath.Join(r.cfg.DataDir, fmt.Sprintf("snap-%d-%d", index, time.Now().UnixNano()))
	n, err := r.receiveSnapshot(dir, index, first, stream)
	if err != nil {
		os.RemoveAll(dir)
		r.log.Warn("receiving snapshot failed", "from", fmt.Sprintf("%x", m.GetFrom()), "index", index, "err", err)
		return nil, err
	}
	r.snaps.offer(&incomingSnap{index: index, dir: dir})
	r.log.Info("received snapshot", "from", fmt.Sprintf("%x", m.GetFrom()), "index", index, "pairs", n, "took", time.Since(start))
	if err := r.node.Step(ctx, m); err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, err)
	}
	return connect.NewResponse(&peerv1.SnapshotResponse{}), nil
}

// receiveSnapshot writes the streamed pairs into a new database in dir and flushes it.
func (r *Replica) receiveSnapshot(dir string, index uint64, chunk *peerv1.SnapshotChunk, stream *connect.ClientStream[peerv1.SnapshotChunk]) (uint64, error) {
	opts := statePebbleOptions(r.log)
	if r.cfg.fs != nil {
		opts.FS = r.cfg.fs
	}
	// Nothing here needs a WAL: the database counts only once flushed below.
	opts.DisableWAL = true
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return 0, err
	}
	defer func() {
		if db != nil {
			db.Close()
		}
	}()
	var n uint64
	sum := newPairHash()
	for {
		if len(chunk.GetKeys()) != len(chunk.GetValues()) {
			return 0, connect.NewError(connect.CodeInvalidArgument, errors.New("snapshot chunk has unpaired keys and values"))
		}
		if len(chunk.GetKeys()) > 0 {
			b := db.NewBatch()
			for i, k := range chunk.GetKeys() {
				sum.add(k, chunk.GetValues()[i])
				if err := b.Set(k, chunk.GetValues()[i], nil); err != nil {
					b.Close()
					return 0, err
				}
			}
			if err := b.Commit(pebble.NoSync); err != nil {
				b.Close()
				return 0, err
			}
			b.Close()
			n += uint64(len(chunk.GetKeys()))
		}
		if chunk.GetLast() {
			if chunk.GetTotal() != n {
				return 0, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("snapshot holds %d pairs, %d announced", n, chunk.GetTotal()))
			}
			if !bytes.Equal(chunk.GetSha256(), sum.sum()) {
				return 0, connect.NewError(connect.CodeDataLoss, errors.New("snapshot pairs do not match the sender's SHA-256"))
			}
			break
		}
		if !stream.Receive() {
			if err := stream.Err(); err != nil {
				return 0, err
			}
			return 0, connect.NewError(connect.CodeInvalidArgument, errors.New("snapshot stream ended before its last chunk"))
		}
		chunk = stream.Msg()
	}
	pos, err := loadApplied(db)
	if err != nil {
		return 0, err
	}
	if pos.index != index {
		return 0, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("snapshot data is at index %d, its metadata says %d", pos.index, index))
	}
	if err := db.Flush(); err != nil {
		return 0, err
	}
	err = db.Close()
	db = nil
	if err != nil {
		return 0, err
	}
	return n, syncDir(r.cfg.DataDir)
}

// installSnapshot replaces the state machine with the received snapshot Raft handed
// back in a Ready. It runs on the apply loop, after every earlier entry was applied.
func (r *Replica) installSnapshot(snap *raftpb.Snapshot) {
	index := snap.GetMetadata().GetIndex()
	in := r.snaps.take(index)
	if in == nil {
		panic(fmt.Sprintf("raft delivered snapshot %d that this replica never received", index))
	}
	st, err := r.openState(in.dir)
	if err != nil {
		panic(fmt.Sprintf("open received snapshot %d: %v", index, err))
	}
	members, err := loadMembers(st.db)
	if err != nil {
		panic(fmt.Sprintf("load members of snapshot %d: %v", index, err))
	}
	pos, err := loadApplied(st.db)
	if err != nil {
		panic(fmt.Sprintf("load applied index of snapshot %d: %v", index, err))
	}
	auth, err := loadAuth(st.db)
	if err != nil {
		panic(fmt.Sprintf("load auth store of snapshot %d: %v", index, err))
	}
	alarms, err := loadAlarms(st.db)
	if err != nil {
		panic(fmt.Sprintf("load alarms of snapshot %d: %v", index, err))
	}
	if err := writeStateFile(r.cfg.DataDir, filepath.Base(in.dir)); err != nil {
		panic(fmt.Sprintf("point %s at snapshot %d: %v", stateFileName, index, err))
	}
	r.stateMu.Lock()
	old := r.st
	r.st = st
	r.members.replace(members)
	r.auth.install(auth)
	r.alarms.install(alarms)
	r.stateMu.Unlock()
	r.applied.Store(pos.index)
	r.appliedTerm.Store(pos.term)
	r.notifyApplied()
	r.m.snapshotsInstalled.Inc()
	r.log.Info("installed snapshot", "index", pos.index, "term", pos.term, "revision", st.kv.Rev())
	r.snaps.wg.Add(1)
	go func() {
		defer r.snaps.wg.Done()
		if err := old.close(); err != nil {
			r.log.Warn("closing replaced state", "err", err)
		}
		os.RemoveAll(old.dir)
	}()
}

// pairHash is the SHA-256 of a snapshot's pairs (peerv1.SnapshotChunk.sha256).
type pairHash struct {
	h   hash.Hash
	buf []byte
}

func newPairHash() *pairHash { return &pairHash{h: sha256.New()} }

func (p *pairHash) add(k, v []byte) {
	p.buf = binary.AppendUvarint(p.buf[:0], uint64(len(k)))
	p.h.Write(p.buf)
	p.h.Write(k)
	p.buf = binary.AppendUvarint(p.buf[:0], uint64(len(v)))
	p.h.Write(p.buf)
	p.h.Write(v)
}

func (p *pairHash) sum() []byte { return p.h.Sum(nil) }
