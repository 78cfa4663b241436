package gateway

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/notify"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
)

// view is the gateway's picture of the cluster: the members (learned from the
// replicas' MemberList, starting from the configured addresses) and the leader
// (from their Status). A background loop refreshes it; a failed call triggers a
// refresh at once. Nothing in it is state the gateway owns: a new gateway learns it in
// one round.
type view struct {
	g    *Gateway
	dial replicaapi.Dialer

	mu     sync.RWMutex
	conns  map[string]*replicaConn // by internal API URL, every replica ever seen
	voters []*replicaConn          // members that vote, for reads and writes
	leader *replicaConn            // nil when unknown
	leadID uint64
	// lastLead is the last leader known (leadID is 0 while none is), to count changes.
	lastLead uint64
	seeds    []*replicaConn
	next     atomic.Uint32 // round robin over voters
	refresh  chan struct{}
	updated  notify.Notifier // at the end of every refresh
	cluster  atomic.Uint64   // the cluster's ID, once a replica told it
}

// replicaConn is the gateway's link to one replica's internal API.
type replicaConn struct {
	url string
	id  uint64
	api replicaapi.Conn
	// downUntil is when a replica that could not be reached is tried again.
	downUntil atomic.Int64
}

func (c *replicaConn) up(now time.Time) bool { return c.downUntil.Load() <= now.UnixNano() }

// refreshInterval is how often the view is refreshed when nothing fails.
const refreshInterval = 500 * time.Millisecond

// updateTimeout bounds one refresh of the view.
const updateTimeout = 2 * time.Second

// downFor is how long a replica that could not be reached is passed over.
const downFor = time.Second

// newView starts from the replicas at urls (checked by Config.Validate), reached
// through dial.
func newView(g *Gateway, dial replicaapi.Dialer, urls []string) (*view, error) {
	v := &view{g: g, dial: dial, conns: make(map[string]*replicaConn), refresh: make(chan struct{}, 1)}
	for _, u := range urls {
		c, err := v.conn(u)
		if err != nil {
			return nil, fmt.Errorf("KVMESH_GATEWAY_REPLICAS: %w", err)
		}
		v.seeds = append(v.seeds, c)
	}
	v.voters = v.seeds
	return v, nil
}

// conn returns the link to the replica at u, making it on first use.
func (v *view) conn(u string) (*replicaConn, error) {
	u = strings.TrimRight(u, "/")
	if c := v.conns[u]; c != nil {
		return c, nil
	}
	api, err := v.dial.Dial(u)
	if err != nil {
		return nil, err
	}
	c := &replicaConn{url: u, api: api}
	v.conns[u] = c
	return c, nil
}

// close closes the links to every replica.
func (v *view) close() {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, c := range v.conns {
		c.api.Close()
	}
}

// kick asks the refresh loop for a refresh now.
func (v *view) kick() {
	select {
	case v.refresh <- struct{}{}:
	default:
	}
}

func (v *view) run(ctx context.Context) {
	t := time.NewTicker(refreshInterval)
	defer t.Stop()
	for {
		v.update(ctx)
		v.updated.Notify()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-v.refresh:
		}
	}
}

// update asks one replica that answers (the leader first) for the membership, and
// every voter for its view of the leader; the leader is the one a majority of the
// answers name, so a replica cut off from the others cannot mislead the gateway.
func (v *view) update(ctx context.Context) {
	// Longer than the refresh interval: on a loaded machine a replica can take that
	// long to answer, and a timeout must not pass for a cluster without a leader.
	ctx, cancel := context.WithTimeout(ctx, updateTimeout)
	defer cancel()
	v.mu.RLock()
	order := append([]*replicaConn(nil), v.voters...)
	if v.leader != nil {
		order = append([]*replicaConn{v.leader}, order...)
	}
	order = append(order, v.seeds...)
	v.mu.RUnlock()
	var members []*pb.Member
	for _, c := range order {
		resp, err := c.api.MemberList(ctx, &pb.MemberListRequest{})
		if err == nil {
			members = resp.GetMembers()
			v.cluster.Store(resp.GetHeader().GetClusterId())
			break
		}
		if ctx.Err() != nil {
			return
		}
	}
	if members == nil {
		return // nothing answered: keep what we knew
	}
	v.mu.Lock()
	var voters []*replicaConn
	for _, m := range members {
		if m.GetIsLearner() || len(m.GetPeerURLs()) == 0 {
			continue
		}
		c, err := v.conn(m.GetPeerURLs()[0])
		if err != nil {
			v.g.log.Warn("a member's URL cannot be dialed", "member", m.GetID(), "url", m.GetPeerURLs()[0], "err", err)
			continue
		}
		c.id = m.GetID()
		voters = append(voters, c)
	}
	v.mu.Unlock()
	if len(voters) == 0 {
		return
	}

	// Each voter's opinion of the leader, in parallel.
	votes := make([]uint64, len(voters))
	answered := make([]bool, len(voters))
	var wg sync.WaitGroup
	for i, c := range voters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := c.api.Status(ctx, &pb.StatusRequest{})
			if err != nil {
				c.downUntil.Store(time.Now().Add(downFor).UnixNano())
				return
			}
			c.downUntil.Store(0)
			votes[i], answered[i] = st.GetLeader(), true
		}()
	}
	wg.Wait()
	if !slices.ContainsFunc(answered, func(a bool) bool { return a }) {
		// No voter answered: keep the leader we knew (the next update asks again).
		v.mu.Lock()
		v.voters = voters
		v.mu.Unlock()
		return
	}
	count := map[uint64]int{}
	var lead uint64
	for _, l := range votes {
		if l == 0 {
			continue
		}
		count[l]++
		if count[l] > len(voters)/2 {
			lead = l
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.voters = voters
	if lead != 0 && lead != v.lastLead {
		if v.lastLead != 0 {
			v.g.m.leaderChanges.Inc()
		}
		v.lastLead = lead
	}
	v.leadID, v.leader = lead, nil
	for _, c := range voters {
		if c.id == lead {
			v.leader = c
		}
	}
}

// leaderID is the leader's member ID, 0 when the cluster has none (as far as the
// gateway knows).
// clusterID is the cluster's ID (0 until a replica answered).
func (v *view) clusterID() uint64 { return v.cluster.Load() }

func (v *view) leaderID() uint64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.leadID
}

// leaderNow is leaderID, except that when the view knows no leader it first waits for
// a refresh that began after the call (the view lags an election by up to a refresh
// interval). Callers share the refreshes: a thousand watch streams asking at once
// cost the replicas one round of Status calls. 0 when ctx ends first.
func (v *view) leaderNow(ctx context.Context) uint64 {
	for range 2 { // the refresh running now may have begun before the call
		updated := v.updated.C()
		id := v.leaderID()
		if id != 0 {
			return id
		}
		v.kick()
		select {
		case <-updated:
		case <-ctx.Done():
			return 0
		}
	}
	return v.leaderID()
}

// reachable counts the voters not marked down.
func (v *view) reachable(now time.Time) int {
	v.mu.RLock()
	defer v.mu.RUnlock()
	n := 0
	for _, c := range v.voters {
		if c.up(now) {
			n++
		}
	}
	return n
}

// forWrite lists the replicas to try for a request that must reach the leader: the
// leader first, then the other voters (which forward to the leader).
func (v *view) forWrite() []*replicaConn {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make([]*replicaConn, 0, len(v.voters)+1)
	if v.leader != nil && v.leader.up(time.Now()) {
		out = append(out, v.leader)
	}
	return appendUp(out, v.voters, v.leader, 0)
}

// forRead lists the replicas to try for a read, starting at the next voter in turn so
// that reads spread over the cluster.
func (v *view) forRead() []*replicaConn {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return appendUp(make([]*replicaConn, 0, len(v.voters)), v.voters, nil, v.next.Add(1))
}

// appendUp appends the voters except skip, starting at index start: those up first,
// then those recently down (a last resort beats no answer).
func appendUp(out, voters []*replicaConn, skip *replicaConn, start uint32) []*replicaConn {
	now := time.Now()
	n := len(voters)
	var down []*replicaConn
	for i := range n {
		c := voters[(int(start)+i)%n]
		if c == skip {
			continue
		}
		if c.up(now) {
			out = append(out, c)
		} else {
			down = append(down, c)
		}
	}
	return append(out, down...)
}

// markDown passes over c for a while and asks for a refresh.
func (v *view) markDown(c *replicaConn) {
	c.downUntil.Store(time.Now().Add(downFor).UnixNano())
	v.kick()
}
