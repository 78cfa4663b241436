package replica

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/cockroachdb/pebble/v2"
	"golang.org/x/crypto/bcrypt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/notify"
	"github.com/kvmesh/kvmesh/services/replica/mvcc"
)

// The auth store is part of the replicated state: one record in the state database,
// rewritten whole by every change (auth changes are rare and the store is small), so a
// snapshot carries it and applying a change is one Pebble write in the applied batch.
//
// Gateways decide permissions; a replica holds them to the state they decided with.
// Every request a gateway forwards carries that state's stamp (authz.MetadataKey). A
// write carries it through Raft and is refused at apply, changing nothing, if the state
// has changed in between; a read is refused after it was served. The gateway then
// refreshes its copy and decides again. Only the checks that need the keys attached to
// a lease are made here, where those keys are known.

var authKey = []byte("Aauth") // the auth store (replicav1.AuthState), in the state database

// authSnap is one auth state: the record, the checker built from it, and its keys.
type authSnap struct {
	msg   *replicav1.AuthState
	store *authz.Store
	priv  ed25519.PrivateKey
	pub   ed25519.PublicKey
}

func newAuthSnap(msg *replicav1.AuthState) *authSnap {
	s := &authSnap{msg: msg, store: authz.New(msg)}
	if seed := msg.GetSigningSeed(); len(seed) == ed25519.SeedSize {
		s.priv = ed25519.NewKeyFromSeed(seed)
		s.pub = s.priv.Public().(ed25519.PublicKey)
	}
	return s
}

// loadAuth reads the auth store; a new one is at revision 1, as etcd's.
func loadAuth(db pebble.Reader) (*authSnap, error) {
	msg := &replicav1.AuthState{Revision: 1}
	v, closer, err := db.Get(authKey)
	switch {
	case errors.Is(err, pebble.ErrNotFound):
	case err != nil:
		return nil, err
	default:
		defer closer.Close()
		if err := proto.Unmarshal(v, msg); err != nil {
			return nil, fmt.Errorf("decode auth store: %w", err)
		}
	}
	return newAuthSnap(msg), nil
}

// authState holds the committed auth state (readers) and, on the apply loop, the state
// as of the entries applied into the batch not yet committed.
type authState struct {
	cur     atomic.Pointer[authSnap]
	pending *authSnap
	// changed wakes the feeds, which tell every change's revision.
	changed notify.Notifier
}

// applying is the state apply decides with.
func (a *authState) applying() *authSnap {
	if a.pending != nil {
		return a.pending
	}
	return a.cur.Load()
}

// publish makes the state of a committed batch the readers'.
func (a *authState) publish() {
	if a.pending != nil {
		a.cur.Store(a.pending)
		a.pending = nil
		a.changed.Notify()
	}
}

// install makes a (loaded or snapshot's) state the readers'.
func (a *authState) install(s *authSnap) {
	a.cur.Store(s)
	a.changed.Notify()
}

// revision is the committed auth store's revision.
func (a *authState) revision() uint64 { return a.cur.Load().store.Revision }

// admit is apply's auth check of a request a gateway decided: refused if the auth
// state changed since the decision, and checked against the keys of the leases it
// touches (etcd's checkLeasePuts), which only the state machine knows.
func (r *Replica) admit(wr *mvcc.Writer, req *replicav1.RaftRequest) error {
	stamp := req.GetAuthStamp()
	if stamp == nil {
		return nil
	}
	a := r.auth.applying()
	if !a.store.Matches(stamp) {
		return etcderr.ErrAuthStale
	}
	if !a.store.Enabled {
		return nil
	}
	ai := decisionInfo(req.GetAuthUser(), stamp)
	var leases []int64
	switch op := req.GetRequest().(type) {
	case *replicav1.RaftRequest_Put:
		if id := op.Put.GetLease(); id != 0 {
			leases = append(leases, id)
		}
	case *replicav1.RaftRequest_Txn:
		leases = authz.TxnPutLeases(op.Txn, nil)
	case *replicav1.RaftRequest_LeaseRevoke:
		leases = append(leases, op.LeaseRevoke.GetID())
	}
	for _, id := range leases {
		if err := a.store.CheckLeaseKeys(ai, wr.LeaseKeys(id), true); err != nil {
			return err
		}
	}
	return nil
}

// decisionInfo is who a decided request runs as: the user at the decision's revision.
func decisionInfo(user string, stamp *replicav1.AuthStamp) *authz.Info {
	if user == "" {
		return nil
	}
	return &authz.Info{User: user, Revision: stamp.GetRevision()}
}

// applyAuth applies a change of the auth store into the batch.
func (r *Replica) applyAuth(b *pebble.Batch, req *replicav1.AuthRequest) result {
	cur := r.auth.applying()
	next, resp, err := authz.Apply(cur.msg, req)
	if err != nil {
		return result{err: err}
	}
	if next != cur.msg {
		v, err := proto.Marshal(next)
		if err != nil {
			return result{err: err}
		}
		if err := b.Set(authKey, v, nil); err != nil {
			return result{err: err}
		}
		r.auth.pending = newAuthSnap(next)
	}
	return result{resp: resp}
}

// checkRead holds a served read to the auth state its gateway decided with (etcd
// checks a read's auth revision after the read, too).
func (r *Replica) checkRead(ctx context.Context) error {
	return r.checkLeaseRead(ctx, nil)
}

// checkLeaseRead is checkRead and etcd's check of reading leases' keys
// (LeaseTimeToLive with keys, LeaseLeases): an admin may, anyone else must be allowed
// to read every key attached.
func (r *Replica) checkLeaseRead(ctx context.Context, keys [][]byte) error {
	d, ok := authz.DecisionFrom(ctx)
	if !ok {
		return nil
	}
	a := r.auth.cur.Load()
	if !a.store.Matches(d.Stamp) {
		return etcderr.ErrAuthStale
	}
	if !a.store.Enabled || len(keys) == 0 {
		return nil
	}
	return a.store.CheckLeaseKeys(decisionInfo(d.User, d.Stamp), keys, false)
}

// decisionFromHeader reads a gateway's decision from a request's metadata value.
func decisionFromHeader(ctx context.Context, v string) (context.Context, error) {
	if v == "" {
		return ctx, nil
	}
	d, ok := authz.Decode(v)
	if !ok {
		return ctx, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("malformed %s metadata", authz.MetadataKey))
	}
	return authz.WithDecision(ctx, d), nil
}

// authGRPCInterceptor carries the decision of grpc-go calls into their context.
func authGRPCInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(authz.MetadataKey); len(v) > 0 {
			var err error
			if ctx, err = decisionFromHeader(ctx, v[0]); err != nil {
				return nil, etcderr.ToGRPC(err)
			}
		}
	}
	return next(ctx, req)
}

// authService is etcd's Auth API on a replica, for gateways.
type authService struct {
	replicav1.UnimplementedAuthServiceServer
	r *Replica
}

func (s *authService) State(ctx context.Context, req *replicav1.AuthStateRequest) (*replicav1.AuthStateResponse, error) {
	r := s.r
	if err := r.serving(false); err != nil {
		return nil, err
	}
	if err := r.read.linearizable(ctx); err != nil {
		return nil, err
	}
	a := r.auth.cur.Load()
	resp := &replicav1.AuthStateResponse{Stamp: a.store.Stamp()}
	if k := req.GetKnown(); k == nil || !a.store.Matches(k) {
		resp.State = authz.Public(a.msg, a.pub)
	}
	return resp, nil
}

// Authenticate is etcd's: after a linearizable read, the password is checked against
// the stored bcrypt hash, outside of Raft; the token names the auth revision the check
// was made at, and the check is made again if the store changed meanwhile.
func (s *authService) Authenticate(ctx context.Context, req *pb.AuthenticateRequest) (*pb.AuthenticateResponse, error) {
	r := s.r
	if err := r.serving(false); err != nil {
		return nil, err
	}
	if err := r.read.linearizable(ctx); err != nil {
		return nil, err
	}
	name, password := req.GetName(), req.GetPassword()
	for {
		a := r.auth.cur.Load()
		if !a.store.Enabled {
			return nil, etcderr.ErrAuthNotEnabled
		}
		hash, noPassword, found := authz.PasswordHash(a.msg, name)
		switch {
		case !found:
			return nil, etcderr.ErrAuthFailed
		case noPassword:
			return nil, etcderr.ErrNoPasswordUser
		}
		if bcrypt.CompareHashAndPassword(hash, []byte(password)) != nil {
			r.log.Info("authentication failed: invalid password", "user", name)
			return nil, etcderr.ErrAuthFailed
		}
		if r.auth.cur.Load().store.Revision != a.store.Revision {
			continue // changed while the hash was compared: check again
		}
		if a.priv == nil {
			return nil, connect.NewError(connect.CodeInternal, errors.New("auth store has no signing key"))
		}
		token, err := authz.Sign(a.priv, name, a.store.Revision, time.Now().Add(r.cfg.AuthTokenTTL))
		if err != nil {
			return nil, connect.NewError(connect.CodeInternal, err)
		}
		return &pb.AuthenticateResponse{Header: r.header(&pb.ResponseHeader{Revision: r.rev()}), Token: token}, nil
	}
}

// Call runs the other Auth RPCs: changes go through Raft (passwords hashed first, so
// the log never holds one), reads are answered after a linearizable read.
func (s *authService) Call(ctx context.Context, req *replicav1.AuthRequest) (*replicav1.AuthResponse, error) {
	r := s.r
	if err := r.serving(false); err != nil {
		return nil, err
	}
	m := req
	var resp *replicav1.AuthResponse
	if authz.IsChange(m) {
		m = proto.Clone(m).(*replicav1.AuthRequest)
		if err := r.hashPasswords(m); err != nil {
			return nil, err
		}
		if m.GetAuthEnable() != nil {
			m.SigningSeed = make([]byte, ed25519.SeedSize)
			if _, err := rand.Read(m.SigningSeed); err != nil {
				return nil, connect.NewError(connect.CodeInternal, err)
			}
		}
		out, err := r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_Auth{Auth: m}})
		if err != nil {
			return nil, err
		}
		resp = out.(*replicav1.AuthResponse)
	} else {
		if err := r.read.linearizable(ctx); err != nil {
			return nil, err
		}
		if err := r.checkRead(ctx); err != nil {
			return nil, err
		}
		var err error
		if _, resp, err = authz.Apply(r.auth.cur.Load().msg, m); err != nil {
			return nil, err
		}
	}
	setAuthHeader(resp, r.header(&pb.ResponseHeader{Revision: r.rev()}))
	return resp, nil
}

// hashPasswords replaces a request's password by its bcrypt hash, as etcd does before
// proposing (a user without password keeps none).
func (r *Replica) hashPasswords(m *replicav1.AuthRequest) error {
	hash := func(pw string) (string, error) {
		h, err := bcrypt.GenerateFromPassword([]byte(pw), r.cfg.AuthBcryptCost)
		if err != nil {
			return "", err
		}
		return base64.StdEncoding.EncodeToString(h), nil
	}
	var err error
	switch {
	case m.GetUserAdd() != nil:
		u := m.GetUserAdd()
		if !u.GetOptions().GetNoPassword() {
			u.HashedPassword, err = hash(u.GetPassword())
		}
		u.Password = ""
	case m.GetUserChangePassword() != nil:
		u := m.GetUserChangePassword()
		if u.GetPassword() != "" {
			u.HashedPassword, err = hash(u.GetPassword())
		}
		u.Password = ""
	}
	return err
}

// setAuthHeader sets the header of whichever response an AuthResponse holds.
func setAuthHeader(resp *replicav1.AuthResponse, h *pb.ResponseHeader) {
	rm := resp.ProtoReflect()
	od := rm.Descriptor().Oneofs().ByName("response")
	fd := rm.WhichOneof(od)
	if fd == nil {
		return
	}
	inner := rm.Get(fd).Message()
	if hf := inner.Descriptor().Fields().ByName("header"); hf != nil {
		inner.Set(hf, protoreflect.ValueOfMessage(h.ProtoReflect()))
	}
}
