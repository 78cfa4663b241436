package gateway

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/meshtls"
	"github.com/kvmesh/kvmesh/libs/notify"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/gateway/namespace"
	"github.com/kvmesh/kvmesh/services/gateway/watch"
)

// Access control at the gateway. The gateway keeps a copy of the auth state (users,
// roles, permissions and the token verification key; no password hashes, no signing
// key), verifies tokens itself and decides every request by etcd's rules. It sends
// the request on with the stamp of the copy it decided with; a replica refuses it if
// the state has changed since (ErrAuthStale), before it changes anything, and the
// gateway refreshes its copy and decides again. A token naming a newer auth revision
// than the copy also makes it refresh first. So a permission change holds on every
// gateway from the first request after it is committed.

// authRetries bounds how often one request is decided again after the state changed
// under it.
const authRetries = 5

// authRefreshInterval is how often the copy is compared with the replicas' while
// nothing else makes the gateway look (one linearizable read that answers only a
// stamp while nothing changed).
const authRefreshInterval = time.Second

type authCache struct {
	g        *Gateway
	cur      atomic.Pointer[authz.Store] // the copy; read on every request
	verifier authz.Verifier

	// Rounds of linearizable refreshes: a caller that needs a copy at least as new as
	// the moment it asked joins the next round that starts after it asked.
	roundMu  sync.Mutex
	running  bool
	next     *refreshRound
	failures *failureLimiter

	// announced is the highest auth revision the revision stream's state has told
	// (see hub.watchState); a copy behind it is being refreshed. stored wakes those
	// waiting for the copy to catch up.
	announced atomic.Uint64
	stored    notify.Notifier
}

type refreshRound struct {
	done chan struct{}
	err  error
}

func newAuthCache(g *Gateway) *authCache {
	return &authCache{g: g, failures: newFailureLimiter()}
}

// current is the copy, fetched if the gateway has none yet.
func (a *authCache) current(ctx context.Context) (*authz.Store, error) {
	if s := a.cur.Load(); s != nil {
		return s, nil
	}
	if err := a.refresh(ctx); err != nil {
		return nil, err
	}
	return a.cur.Load(), nil
}

// refresh brings the copy up to date with a linearizable read that starts after the
// call: concurrent callers share rounds.
func (a *authCache) refresh(ctx context.Context) error {
	a.roundMu.Lock()
	if a.next == nil {
		a.next = &refreshRound{done: make(chan struct{})}
	}
	r := a.next
	if !a.running {
		a.running = true
		a.next = nil
		go a.runRounds(r)
	}
	a.roundMu.Unlock()
	select {
	case <-r.done:
		return r.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// runRounds runs round r, then the round that gathered while r ran, until none did.
func (a *authCache) runRounds(r *refreshRound) {
	for r != nil {
		r.err = a.fetch()
		close(r.done)
		a.roundMu.Lock()
		r = a.next
		a.next = nil
		if r == nil {
			a.running = false
		}
		a.roundMu.Unlock()
	}
}

// fetch asks a replica for the state, sending the stamp of the copy.
func (a *authCache) fetch() error {
	ctx, cancel := context.WithTimeout(telemetry.Untraced(context.Background()), 2*updateTimeout)
	defer cancel()
	req := &replicav1.AuthStateRequest{}
	if known := a.cur.Load(); known != nil {
		req.Known = known.Stamp()
	}
	resp, err := call(ctx, a.g, leaderRead, replicaapi.API.AuthState, req)
	if err != nil {
		return err
	}
	// Rounds run one at a time and each reads linearizably after the last: the
	// answer is never older than the copy.
	if st := resp.GetState(); st != nil {
		a.cur.Store(authz.New(st))
		a.stored.Notify()
	}
	return nil
}

// announce is the stream's word that the replicas' auth store is at rev: a copy
// behind it is refreshed (one call, shared with every caller waiting for it).
func (a *authCache) announce(rev uint64) {
	for {
		known := a.announced.Load()
		if rev <= known || a.announced.CompareAndSwap(known, rev) {
			break
		}
	}
	if s := a.cur.Load(); s != nil && s.Revision < rev {
		go func() {
			if err := a.refresh(telemetry.Untraced(context.Background())); err != nil {
				a.g.log.Debug("auth state refresh after an announced change failed", "err", err)
			}
		}()
	}
}

// await returns the copy once it is at revision want or later, or the copy it has
// when limit passes or ctx ends first. It calls no replica: what brings the copy
// forward is a refresh under way (announce, the periodic one).
func (a *authCache) await(ctx context.Context, want uint64, limit time.Duration) *authz.Store {
	timeout := time.NewTimer(limit)
	defer timeout.Stop()
	for {
		stored := a.stored.C()
		s := a.cur.Load()
		if s.Revision >= want {
			return s
		}
		select {
		case <-stored:
		case <-timeout.C:
			return a.cur.Load()
		case <-ctx.Done():
			return a.cur.Load()
		}
	}
}

// run keeps the copy fresh in the background.
func (a *authCache) run(ctx context.Context) {
	t := time.NewTicker(authRefreshInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := a.refresh(ctx); err != nil && ctx.Err() == nil {
				a.g.log.Debug("auth state refresh failed", "err", err)
			}
		}
	}
}

type credentialsKey struct{}

// withCredentials carries the token a client sent (metadata "token", or
// "authorization" with or without "Bearer ", as etcd accepts them).
func withCredentials(ctx context.Context, get func(string) string) context.Context {
	tok := get("token")
	if tok == "" {
		tok = get("authorization")
	}
	if tok == "" {
		return ctx
	}
	return context.WithValue(ctx, credentialsKey{}, strings.TrimPrefix(tok, "Bearer "))
}

type internalKey struct{}

// internal marks the gateway's own requests (health checks), which no user makes and
// no auth check applies to.
func internal(ctx context.Context) context.Context {
	return context.WithValue(ctx, internalKey{}, true)
}

// check decides one request against an auth state for the user it runs as (nil: no
// user, as etcd's AuthInfo).
type check func(s *authz.Store, ai *authz.Info) error

// allow is the check of requests that only need a valid token when one is given.
func allow(*authz.Store, *authz.Info) error { return nil }

// decide makes the decision for a request, refreshing the copy when the client's
// token is newer than it.
func (g *Gateway) decide(ctx context.Context, chk check) (context.Context, *authz.Info, error) {
	if ctx.Value(internalKey{}) != nil {
		return ctx, nil, nil
	}
	s, err := g.auth.current(ctx)
	if err != nil {
		return ctx, nil, err
	}
	ai, err := g.authInfo(ctx, s)
	if err == errTokenAhead {
		if err := g.auth.refresh(ctx); err != nil {
			return ctx, nil, err
		}
		if s, err = g.auth.current(ctx); err != nil {
			return ctx, nil, err
		}
		ai, err = g.authInfo(ctx, s)
		if err == errTokenAhead {
			// Still ahead of a fresh copy: a token no replica issued. etcd ignores
			// tokens while auth is disabled.
			ai, err = nil, etcderr.ErrInvalidAuthToken
			if !s.Enabled {
				err = nil
			}
		}
	}
	if err != nil {
		return ctx, nil, err
	}
	if err := chk(s, ai); err != nil {
		return ctx, nil, err
	}
	user := ""
	if ai != nil {
		user = ai.User
	}
	return authz.WithDecision(ctx, s.Decision(user)), ai, nil
}

var errTokenAhead = errors.New("token from a newer auth state than the gateway's copy")

// authInfo is etcd's AuthInfoFromCtx: nothing while auth is disabled or no token was
// sent; otherwise the user the token names, or "invalid auth token".
func (g *Gateway) authInfo(ctx context.Context, s *authz.Store) (*authz.Info, error) {
	tok, _ := ctx.Value(credentialsKey{}).(string)
	if !s.Enabled {
		// A token issued at or after the copy's revision while the copy says auth
		// is disabled (no replica issues tokens then: it was enabled since) says the
		// copy is behind: the revision it claims, unverified, only asks for a refresh.
		// A token from before a disable claims an older revision and is ignored.
		if rev := authz.ClaimedRevision(tok); tok != "" && rev >= s.Revision {
			return &authz.Info{Revision: rev}, errTokenAhead
		}
		return nil, nil
	}
	if tok == "" {
		if g.cfg.ClientCertAuth {
			// etcd's AuthInfoFromTLS: without a token, the verified client
			// certificate's common name is the user.
			if cn := meshtls.CommonName(ctx); cn != "" {
				return &authz.Info{User: cn, Revision: s.Revision}, nil
			}
		}
		return nil, nil
	}
	info, err := g.auth.verifier.Verify(s.PublicKey, tok, time.Now())
	if err != nil {
		return nil, etcderr.ErrInvalidAuthToken
	}
	if info.Revision > s.Revision {
		return &info, errTokenAhead
	}
	return &info, nil
}

// authorized decides a request and runs it, deciding again (after a refresh) when a
// replica found the auth state changed since the decision. A request the copy denies
// is decided again on a fresh copy before it is refused: a replica catches a stale
// permit, but nothing would catch a stale denial (say, auth disabled a moment ago).
func authorized[Res any](ctx context.Context, g *Gateway, chk check, do func(context.Context) (*Res, error)) (*Res, error) {
	refreshed := false
	for i := 0; ; i++ {
		dctx, _, err := g.decide(ctx, chk)
		if err != nil {
			if refreshed || ctx.Value(internalKey{}) != nil {
				return nil, err
			}
			if rerr := g.auth.refresh(ctx); rerr != nil {
				return nil, err
			}
			refreshed = true
			continue
		}
		res, err := do(dctx)
		if err == nil || !errors.Is(err, etcderr.ErrAuthStale) {
			return res, err
		}
		g.m.authStale.Inc()
		if i == authRetries {
			return nil, etcderr.ErrAuthOldRevision
		}
		if err := g.auth.refresh(ctx); err != nil {
			return nil, err
		}
		refreshed = true
	}
}

// failureLimiter limits failed Authenticate attempts per user and per client address:
// each key may fail authFailureBurst times in a row, then once per
// authFailureInterval; a success for a user clears that user's count.
type failureLimiter struct {
	mu   sync.Mutex
	keys map[string]*failures
}

type failures struct {
	n    int
	last time.Time
}

const (
	authFailureBurst    = 5
	authFailureInterval = time.Second
	// authFailureForget is when a key's count is dropped.
	authFailureForget = time.Minute
)

func newFailureLimiter() *failureLimiter { return &failureLimiter{keys: make(map[string]*failures)} }

// allowed tells whether an attempt for every key may be made now.
func (l *failureLimiter) allowed(now time.Time, keys ...string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range keys {
		f := l.keys[k]
		if f == nil {
			continue
		}
		if now.Sub(f.last) > authFailureForget {
			delete(l.keys, k)
			continue
		}
		if f.n >= authFailureBurst && now.Sub(f.last) < authFailureInterval {
			return false
		}
	}
	return true
}

func (l *failureLimiter) failed(now time.Time, keys ...string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.keys) > 1<<16 {
		for k, f := range l.keys {
			if now.Sub(f.last) > authFailureForget {
				delete(l.keys, k)
			}
		}
	}
	for _, k := range keys {
		f := l.keys[k]
		if f == nil {
			f = &failures{}
			l.keys[k] = f
		}
		f.n++
		f.last = now
	}
}

func (l *failureLimiter) succeeded(key string) {
	l.mu.Lock()
	delete(l.keys, key)
	l.mu.Unlock()
}

// watchAuthWait is how long a watch create may wait for the gateway's copy of the auth
// state to catch up with what the revision stream announced, or with its token.
const watchAuthWait = time.Second

// watchPermitted is etcd's check at watch creation (isWatchPermitted), made as an etcd
// member makes it: on the auth state the gateway holds, with no call to a replica. The
// copy follows the replicas' through the revision stream's state (announce): a create
// the copy denies, or whose token is newer than the copy, waits a moment for a
// refresh under way and is decided again, so that a change made through another
// gateway holds from the moment the stream tells it. A token newer than anything the
// gateway could learn in that moment is taken as an etcd member whose auth store lags
// the token's takes it. The keys come back mapped into the namespace of the user the
// watch is decided for.
//
// A *watch.Refusal is a refusal with one of etcd's reasons. Any other error means the
// gateway could not decide (no copy of the auth state yet, the stream ending): the
// stream fails instead, because a watch refused for a reason etcd never gives is
// mishandled by clients, and clientv3 loses one whose stream ends right after it.
func (g *Gateway) watchPermitted(ctx context.Context, cr *pb.WatchCreateRequest) (*pb.WatchCreateRequest, []byte, error) {
	var p []byte
	cur := cr
	var ahead uint64 // the revision of a token newer than the copy
	permitted := func(s *authz.Store, lagging bool) error {
		ai, err := g.authInfo(ctx, s)
		if errors.Is(err, errTokenAhead) {
			ahead = ai.Revision
			if lagging {
				err = nil
				if !s.Enabled {
					ai = nil
				}
			}
		}
		if err != nil {
			return err
		}
		p = g.prefix(s, ai)
		cur = namespace.WatchIn(p, cr)
		return s.IsRangePermitted(ai, cur.GetKey(), cur.GetRangeEnd())
	}
	s, err := g.auth.current(ctx)
	if err != nil {
		return nil, nil, err
	}
	if err = permitted(s, false); err != nil {
		if errors.Is(err, errTokenAhead) {
			// The client holds a token from an auth state newer than the copy (an
			// auth change a moment ago): bring the copy to it, as an etcd member
			// applies the change before it answers. Rare, and shared with every
			// caller waiting: the steady state calls no replica.
			rctx, cancel := context.WithTimeout(ctx, watchAuthWait)
			if err := g.auth.refresh(rctx); err != nil {
				g.log.Debug("auth state refresh for a newer token failed", "err", err)
			}
			cancel()
		}
		if fresh := g.auth.await(ctx, max(g.auth.announced.Load(), ahead), watchAuthWait); fresh != s {
			s = fresh
			err = permitted(s, false)
		}
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		if errors.Is(err, errTokenAhead) {
			err = permitted(s, true)
		}
	}
	if err == nil {
		return cur, p, nil
	}
	reason := etcderr.ErrPermissionDenied
	var ee *etcderr.Error
	if errors.As(err, &ee) && (ee == etcderr.ErrInvalidAuthToken || ee == etcderr.ErrAuthOldRevision || ee == etcderr.ErrUserEmpty) {
		reason = ee
	}
	// etcd's reason is the text of its gRPC status error.
	code, msg := etcderr.CodeMessage(reason)
	return nil, nil, &watch.Refusal{Reason: status.Error(codes.Code(code), msg).Error()}
}
