package replica

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	raftpb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
)

var (
	identityKey  = []byte("Aid")      // member id, cluster id (in the raft database)
	appliedKey   = []byte("Aapplied") // last applied raft index and its term
	confStateKey = []byte("Aconf")    // raft ConfState after the last applied conf change
	memberPrefix = []byte("Am")       // + member id → etcdserverpb.Member
	removedKey   = []byte("Ar")       // + member id → empty: removed for good
)

type identity struct{ member, cluster uint64 }

func loadIdentity(db *pebble.DB) (*identity, error) {
	v, closer, err := db.Get(identityKey)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer closer.Close()
	if len(v) != 16 {
		return nil, fmt.Errorf("corrupt identity record (%d bytes)", len(v))
	}
	return &identity{member: binary.BigEndian.Uint64(v), cluster: binary.BigEndian.Uint64(v[8:])}, nil
}

func saveIdentity(db *pebble.DB, id identity) error {
	v := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, id.member), id.cluster)
	return db.Set(identityKey, v, pebble.Sync)
}

// appliedPos is the last applied entry's index and term.
type appliedPos struct{ index, term uint64 }

func loadApplied(r pebble.Reader) (appliedPos, error) {
	v, closer, err := r.Get(appliedKey)
	if errors.Is(err, pebble.ErrNotFound) {
		return appliedPos{}, nil
	}
	if err != nil {
		return appliedPos{}, err
	}
	defer closer.Close()
	if len(v) != 16 {
		return appliedPos{}, fmt.Errorf("corrupt applied index record (%d bytes)", len(v))
	}
	return appliedPos{index: binary.BigEndian.Uint64(v), term: binary.BigEndian.Uint64(v[8:])}, nil
}

func saveApplied(b *pebble.Batch, p appliedPos) error {
	return b.Set(appliedKey, binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, p.index), p.term), nil)
}

func memberKey(id uint64) []byte {
	return binary.BigEndian.AppendUint64(append([]byte(nil), memberPrefix...), id)
}

// memberTable is the cluster's membership, changed only by applied conf changes.
type memberTable struct {
	mu      sync.RWMutex
	members map[uint64]*pb.Member
	conf    *raftpb.ConfState
	gone    map[uint64]bool       // removed members, whose IDs are never reused
	pending map[uint64]*pb.Member // applied into the current batch, not yet committed
	removed map[uint64]bool
	pconf   *raftpb.ConfState
}

func loadMembers(db pebble.Reader) (*memberTable, error) {
	t := &memberTable{members: make(map[uint64]*pb.Member), gone: make(map[uint64]bool), conf: &raftpb.ConfState{}}
	upper := append([]byte(nil), removedKey...)
	upper[len(upper)-1]++
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: memberPrefix, UpperBound: upper})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		if len(it.Key()) == len(removedKey)+8 && string(it.Key()[:len(removedKey)]) == string(removedKey) {
			t.gone[binary.BigEndian.Uint64(it.Key()[len(removedKey):])] = true
			continue
		}
		m := &pb.Member{}
		if err := proto.Unmarshal(it.Value(), m); err != nil {
			return nil, fmt.Errorf("decode member: %w", err)
		}
		t.members[m.GetID()] = m
	}
	if err := it.Error(); err != nil {
		return nil, err
	}
	v, closer, err := db.Get(confStateKey)
	if err == nil {
		defer closer.Close()
		if err := proto.Unmarshal(v, t.conf); err != nil {
			return nil, fmt.Errorf("decode conf state: %w", err)
		}
	} else if !errors.Is(err, pebble.ErrNotFound) {
		return nil, err
	}
	return t, nil
}

// replace takes the membership of n (loaded from an installed snapshot).
func (t *memberTable) replace(n *memberTable) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.members, t.conf, t.gone = n.members, n.conf, n.gone
	t.pending, t.removed, t.pconf = nil, nil, nil
}

func (t *memberTable) list() []*pb.Member {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*pb.Member, 0, len(t.members))
	for _, m := range t.members {
		out = append(out, proto.Clone(m).(*pb.Member))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetID() < out[j].GetID() })
	return out
}

// isGone tells whether the member was removed from the cluster.
func (t *memberTable) isGone(id uint64) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.gone[id]
}

func (t *memberTable) get(id uint64) *pb.Member {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.members[id]
}

func (t *memberTable) confState() *raftpb.ConfState {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return proto.Clone(t.conf).(*raftpb.ConfState)
}

// committed publishes the membership changes of the batch just committed and returns
// the IDs of the members that changed.
func (t *memberTable) committed() []uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.pending == nil && t.removed == nil && t.pconf == nil {
		return nil
	}
	var changed []uint64
	for id, m := range t.pending {
		t.members[id] = m
		changed = append(changed, id)
	}
	for id := range t.removed {
		delete(t.members, id)
		t.gone[id] = true
		changed = append(changed, id)
	}
	if t.pconf != nil {
		t.conf = t.pconf
	}
	t.pending, t.removed, t.pconf = nil, nil, nil
	return changed
}

// current is the membership including what the batch being applied changed: what a
// conf change applied next must be validated against.
func (t *memberTable) current() (members map[uint64]*pb.Member, gone map[uint64]bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	members = make(map[uint64]*pb.Member, len(t.members))
	gone = make(map[uint64]bool, len(t.gone))
	for id, m := range t.members {
		members[id] = m
	}
	for id := range t.gone {
		gone[id] = true
	}
	for id, m := range t.pending {
		members[id] = m
	}
	for id := range t.removed {
		delete(members, id)
		gone[id] = true
	}
	return members, gone
}

// stage records a member changed by the batch being applied.
func (t *memberTable) stage(b *pebble.Batch, m *pb.Member) error {
	enc, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	if err := b.Set(memberKey(m.GetID()), enc, nil); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.pending == nil {
		t.pending = make(map[uint64]*pb.Member)
	}
	t.pending[m.GetID()] = m
	return nil
}

// stageRemoval records a member removed by the batch being applied.
func (t *memberTable) stageRemoval(b *pebble.Batch, id uint64) error {
	if err := b.Delete(memberKey(id), nil); err != nil {
		return err
	}
	if err := b.Set(binary.BigEndian.AppendUint64(append([]byte(nil), removedKey...), id), nil, nil); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.pending, id)
	if t.removed == nil {
		t.removed = make(map[uint64]bool)
	}
	t.removed[id] = true
	return nil
}

// stageConf records the configuration produced by the conf change being applied.
func (t *memberTable) stageConf(b *pebble.Batch, cs *raftpb.ConfState) error {
	enc, err := proto.Marshal(cs)
	if err != nil {
		return err
	}
	t.mu.Lock()
	t.pconf = cs
	t.mu.Unlock()
	return b.Set(confStateKey, enc, nil)
}

// applyAttributes records a member's published name and client URLs in b.
func (t *memberTable) applyAttributes(b *pebble.Batch, a *replicav1.MemberAttributes) error {
	members, _ := t.current()
	m := members[a.GetId()]
	if m == nil {
		return nil // removed meanwhile
	}
	m = proto.Clone(m).(*pb.Member)
	m.Name = a.GetName()
	m.ClientURLs = a.GetClientUrls()
	return t.stage(b, m)
}

// publish makes the member record say what this replica's configuration says (its
// name and client URLs), as etcd members publish their attributes when they start.
func (r *Replica) publish() {
	want := &replicav1.MemberAttributes{Id: r.id, Name: r.cfg.Name, ClientUrls: r.cfg.ClientURLs}
	for {
		if m := r.members.get(r.id); m != nil && m.GetName() == want.GetName() && slices.Equal(m.GetClientURLs(), want.GetClientUrls()) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), r.cfg.RequestTimeout)
		_, err := r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_MemberAttributes{MemberAttributes: want}})
		cancel()
		if err == nil {
			r.log.Info("published member attributes", "name", want.GetName(), "client_urls", want.GetClientUrls())
			return
		}
		select {
		case <-r.stopc:
			return
		case <-time.After(time.Second):
		}
	}
}
