package e2e

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/authpb"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	elpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	lockpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// authAPI is one server's raw clients, for requests with or without a token.
type authAPI struct {
	kv      pb.KVClient
	lease   pb.LeaseClient
	auth    pb.AuthClient
	maint   pb.MaintenanceClient
	cluster pb.ClusterClient
	watch   pb.WatchClient
	recipes recipeAPI
}

func newAuthAPI(c *grpc.ClientConn) authAPI {
	return authAPI{pb.NewKVClient(c), pb.NewLeaseClient(c), pb.NewAuthClient(c), pb.NewMaintenanceClient(c), pb.NewClusterClient(c), pb.NewWatchClient(c),
		recipeAPI{lockpb.NewLockClient(c), elpb.NewElectionClient(c), pb.NewKVClient(c), pb.NewLeaseClient(c)}}
}

// as returns ctx carrying tok the way clientv3 sends it ("" sends none).
func as(ctx context.Context, tok string) context.Context {
	if tok == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "token", tok)
}

// stripHeader clears a response's header, for responses whose headers carry what
// differs between two servers by nature (IDs, terms).
func stripHeader(m proto.Message) proto.Message {
	if m == nil || !m.ProtoReflect().IsValid() {
		return nil
	}
	m = proto.Clone(m)
	r := m.ProtoReflect()
	if f := r.Descriptor().Fields().ByName("header"); f != nil {
		r.Clear(f)
	}
	return m
}

// authFixture sets up the same users, roles and keys on a server and enables auth:
//
//	root     root role
//	none     no role
//	reader   READ on prefix /in/ and on the key k1
//	writer   WRITE on prefix /in/ and on the key k1
//	rw       READWRITE on prefix /in/ and on the key k1, READ on [/ro/a, /ro/m)
//	split    READ on [/s/a, /s/c) and [/s/c, /s/e) (adjacent), and on the key /s/z
//
// Lease 7001 holds /in/leased, lease 7002 holds /out/leased. The elections /in/el and
// /out/el have leaders (keys /in/el/1b59 on lease 7001 and /out/el/1).
func authFixture(t *testing.T, ctx context.Context, a authAPI) {
	t.Helper()
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("fixture: %s: %v", what, err)
		}
	}
	for _, k := range []string{"/in/a", "/in/b", "/out/a", "k1", "k2", "/ro/b", "/s/b", "/s/d"} {
		_, err := a.kv.Put(ctx, &pb.PutRequest{Key: []byte(k), Value: []byte("v")})
		must("put "+k, err)
	}
	for _, l := range []struct {
		id int64
		k  string
	}{{7001, "/in/leased"}, {7002, "/out/leased"}} {
		id, k := l.id, l.k
		_, err := a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: id, TTL: 600})
		must("grant", err)
		_, err = a.kv.Put(ctx, &pb.PutRequest{Key: []byte(k), Value: []byte("v"), Lease: id})
		must("put leased", err)
	}
	for _, k := range []struct {
		k     string
		lease int64
	}{{"/in/el/1b59", 7001}, {"/out/el/1", 0}} {
		_, err := a.kv.Put(ctx, &pb.PutRequest{Key: []byte(k.k), Value: []byte("leader"), Lease: k.lease})
		must("put election key", err)
	}
	for _, u := range []string{"root", "none", "reader", "writer", "rw", "split"} {
		_, err := a.auth.UserAdd(ctx, &pb.AuthUserAddRequest{Name: u, Password: u + "-pw"})
		must("user add "+u, err)
	}
	for _, r := range []string{"root", "reader", "writer", "rw", "split"} {
		_, err := a.auth.RoleAdd(ctx, &pb.AuthRoleAddRequest{Name: r})
		must("role add "+r, err)
		_, err = a.auth.UserGrantRole(ctx, &pb.AuthUserGrantRoleRequest{User: r, Role: r})
		must("grant role "+r, err)
	}
	grant := func(role string, typ authpb.Permission_Type, key, end string) {
		p := &authpb.Permission{PermType: typ, Key: []byte(key)}
		if end != "" {
			p.RangeEnd = []byte(end)
		}
		_, err := a.auth.RoleGrantPermission(ctx, &pb.AuthRoleGrantPermissionRequest{Name: role, Perm: p})
		must("grant permission", err)
	}
	for i, role := range []string{"reader", "writer", "rw"} {
		typ := []authpb.Permission_Type{authpb.Permission_READ, authpb.Permission_WRITE, authpb.Permission_READWRITE}[i]
		grant(role, typ, "/in/", "/in0")
		grant(role, typ, "k1", "")
	}
	grant("rw", authpb.Permission_READ, "/ro/a", "/ro/m")
	grant("split", authpb.Permission_READ, "/s/a", "/s/c")
	grant("split", authpb.Permission_READ, "/s/c", "/s/e")
	grant("split", authpb.Permission_READ, "/s/z", "")
	_, err := a.auth.AuthEnable(ctx, &pb.AuthEnableRequest{})
	must("auth enable", err)
}

type authStep struct {
	name string
	// errOnly compares errors only (the responses differ by nature: status, hashes).
	errOnly bool
	// since35 marks what etcd 3.4 decides otherwise than etcd 3.5 and later, which
	// kvmesh follows: 3.5 added checks to Compact, Status, HashKV, MemberList and the
	// lease RPCs, checks the ops of nested txns, has AuthStatus, and answers root's
	// permission in RoleGet. Not compared with a 3.4 oracle.
	since35 bool
	call    func(ctx context.Context, a authAPI) (proto.Message, error)
}

func rng(key, end string) func(ctx context.Context, a authAPI) (proto.Message, error) {
	return func(ctx context.Context, a authAPI) (proto.Message, error) {
		r := &pb.RangeRequest{Key: []byte(key)}
		if end != "" {
			r.RangeEnd = []byte(end)
		}
		return a.kv.Range(ctx, r)
	}
}

// authMatrix is every RPC the permission checks cover, inside, outside and across
// the users' ranges. Writes use keys of their own per user, so both servers go
// through the same changes whatever each user may do.
func authMatrix(user string) []authStep {
	u := "/in/" + user
	steps := []authStep{
		{"range a key inside", false, false, rng("/in/a", "")},
		{"range the prefix", false, false, rng("/in/", "/in0")},
		{"range inside the prefix", false, false, rng("/in/a", "/in/c")},
		{"range across the prefix's end", false, false, rng("/in/a", "/out/z")},
		{"range a key outside", false, false, rng("/out/a", "")},
		{"range the single-key permission", false, false, rng("k1", "")},
		{"range from the single key on", false, false, rng("k1", "k2")},
		{"range the key after the single key", false, false, rng("k1\x00", "")},
		{"range open-ended from the prefix", false, false, rng("/in/", "\x00")},
		{"range everything", false, false, rng("\x00", "\x00")},
		{"range inverted inside", false, false, rng("/in/c", "/in/a")},
		{"range a read-only range", false, false, rng("/ro/b", "/ro/c")},
		{"range past a read-only range", false, false, rng("/ro/b", "/ro/z")},
		{"range across adjacent permissions", false, false, rng("/s/a", "/s/e")},
		{"range past adjacent permissions", false, false, rng("/s/b", "/s/f")},
		{"range a lone key permission", false, false, rng("/s/z", "")},
		{"put inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte(u + "/p"), Value: []byte("v")})
		}},
		{"put inside with prev_kv", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte(u + "/p"), Value: []byte("w"), PrevKv: true})
		}},
		{"put the single key", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte("k1"), Value: []byte(user)})
		}},
		{"put outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte("/out/" + user), Value: []byte("v")})
		}},
		{"put inside with a lease holding a key outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte(u + "/l"), Value: []byte("v"), Lease: 7002})
		}},
		{"put inside with a lease holding a key inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Put(ctx, &pb.PutRequest{Key: []byte(u + "/l"), Value: []byte("v"), Lease: 7001})
		}},
		{"delete a key inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte(u + "/p")})
		}},
		{"delete inside with prev_kv", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte(u + "/"), RangeEnd: []byte(u + "0"), PrevKv: true})
		}},
		{"delete outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte("/out/" + user)})
		}},
		{"delete across the prefix", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte(u + "/zz"), RangeEnd: []byte("/out/" + user + "/zz")})
		}},
		{"txn: compare inside, put inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Txn(ctx, &pb.TxnRequest{
				Compare: []*pb.Compare{{Key: []byte("/in/a"), Target: pb.Compare_VERSION, Result: pb.Compare_GREATER, TargetUnion: &pb.Compare_Version{Version: 0}}},
				Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(u + "/t"), Value: []byte("v")}}}},
			})
		}},
		{"txn: compare outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Txn(ctx, &pb.TxnRequest{
				Compare: []*pb.Compare{{Key: []byte("/out/a"), Target: pb.Compare_VERSION, Result: pb.Compare_GREATER, TargetUnion: &pb.Compare_Version{Version: 0}}},
			})
		}},
		{"txn: a read outside in the branch not taken", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Txn(ctx, &pb.TxnRequest{
				Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: []byte("/in/a")}}}},
				Failure: []*pb.RequestOp{{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: []byte("/out/a")}}}},
			})
		}},
		{"txn: nested delete outside", false, true, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestTxn{RequestTxn: &pb.TxnRequest{
				Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: &pb.DeleteRangeRequest{Key: []byte("/out/" + user + "/n")}}}},
			}}}}})
		}},
		{"txn: nested put with a lease holding a key outside", false, true, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestTxn{RequestTxn: &pb.TxnRequest{
				Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(u + "/n"), Lease: 7002}}}},
			}}}}})
		}},
		{"compact", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.kv.Compact(ctx, &pb.CompactionRequest{Revision: 2})
		}},
		{"lease grant", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 8000 + int64(len(user)), TTL: 600})
		}},
		{"lease time to live with keys inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.lease.LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: 7001, Keys: true})
			if r != nil {
				r.TTL = 0
				slices.SortFunc(r.Keys, bytes.Compare)
			}
			return r, err
		}},
		{"lease time to live with keys outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.lease.LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: 7002, Keys: true})
			if r != nil {
				r.TTL = 0
				slices.SortFunc(r.Keys, bytes.Compare)
			}
			return r, err
		}},
		{"lease time to live without keys", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.lease.LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: 7002})
			if r != nil {
				r.TTL = 0
				slices.SortFunc(r.Keys, bytes.Compare)
			}
			return r, err
		}},
		{"lease keep-alive of a lease holding keys inside", false, false, keepAliveOnce(7001)},
		{"lease keep-alive of a lease holding a key outside", false, false, keepAliveOnce(7002)},
		{"lease keep-alive of a lease that does not exist", false, false, keepAliveOnce(7999)},
		{"lease leases", true, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.lease.LeaseLeases(ctx, &pb.LeaseLeasesRequest{})
		}},
		// Lock and Election: their steps are KV requests decided for the caller.
		{"lock inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte(u + "/lk"), Lease: 7001})
		}},
		{"lock outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte("/out/" + user + "/lk"), Lease: 7001})
		}},
		{"lock with a lease holding a key outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte(u + "/lk2"), Lease: 7002})
		}},
		{"lock without a lease", true, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			// The key names the lease the server granted, which differs: it is
			// deleted at once, so later ranges do not see it.
			r, err := a.recipes.lock.Lock(ctx, &lockpb.LockRequest{Name: []byte(u + "/lk0")})
			if err == nil {
				_, err = a.recipes.lock.Unlock(ctx, &lockpb.UnlockRequest{Key: r.Key})
			}
			return r, err
		}},
		{"unlock inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.lock.Unlock(ctx, &lockpb.UnlockRequest{Key: []byte(u + "/lk/1b59")})
		}},
		{"unlock outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.lock.Unlock(ctx, &lockpb.UnlockRequest{Key: []byte("/out/" + user + "/lk/1b59")})
		}},
		{"campaign inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.election.Campaign(ctx, &elpb.CampaignRequest{Name: []byte(u + "/el"), Lease: 7001, Value: []byte("v")})
		}},
		{"campaign outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.election.Campaign(ctx, &elpb.CampaignRequest{Name: []byte("/out/" + user + "/el"), Lease: 7001, Value: []byte("v")})
		}},
		{"proclaim inside with a stale leader key", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.election.Proclaim(ctx, &elpb.ProclaimRequest{Value: []byte("w"),
				Leader: &elpb.LeaderKey{Name: []byte(u + "/el"), Key: []byte(u + "/el/1b59"), Rev: 1, Lease: 7001}})
		}},
		{"proclaim outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.election.Proclaim(ctx, &elpb.ProclaimRequest{Value: []byte("w"),
				Leader: &elpb.LeaderKey{Name: []byte("/out/el"), Key: []byte("/out/el/1"), Rev: 1, Lease: 7001}})
		}},
		{"resign inside with a stale leader key", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.election.Resign(ctx, &elpb.ResignRequest{
				Leader: &elpb.LeaderKey{Name: []byte(u + "/el"), Key: []byte(u + "/el/1b59"), Rev: 1, Lease: 7001}})
		}},
		{"resign outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.election.Resign(ctx, &elpb.ResignRequest{
				Leader: &elpb.LeaderKey{Name: []byte("/out/el"), Key: []byte("/out/el/1"), Rev: 1, Lease: 7001}})
		}},
		{"leader inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.election.Leader(ctx, &elpb.LeaderRequest{Name: []byte("/in/el")})
		}},
		{"leader outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.recipes.election.Leader(ctx, &elpb.LeaderRequest{Name: []byte("/out/el")})
		}},
		{"observe inside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return observeFirst(ctx, a.recipes, "/in/el")
		}},
		{"observe outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return observeFirst(ctx, a.recipes, "/out/el")
		}},
		{"lease revoke of a lease holding a key outside", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: 7002})
		}},
		{"status", true, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.maint.Status(ctx, &pb.StatusRequest{})
		}},
		{"hash kv", true, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.maint.HashKV(ctx, &pb.HashKVRequest{})
		}},
		{"member list", true, true, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.cluster.MemberList(ctx, &pb.MemberListRequest{})
		}},
		{"member update of an unknown member", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.cluster.MemberUpdate(ctx, &pb.MemberUpdateRequest{ID: 12345, PeerURLs: []string{"http://127.0.0.1:1"}})
		}},
		{"member remove of an unknown member", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			return a.cluster.MemberRemove(ctx, &pb.MemberRemoveRequest{ID: 12345})
		}},
		{"auth status", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.auth.AuthStatus(ctx, &pb.AuthStatusRequest{})
			return stripHeader(r), err
		}},
		{"user list", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.auth.UserList(ctx, &pb.AuthUserListRequest{})
			return stripHeader(r), err
		}},
		{"role list", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.auth.RoleList(ctx, &pb.AuthRoleListRequest{})
			return stripHeader(r), err
		}},
		{"user get of oneself", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.auth.UserGet(ctx, &pb.AuthUserGetRequest{Name: user})
			return stripHeader(r), err
		}},
		{"user get of another", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.auth.UserGet(ctx, &pb.AuthUserGetRequest{Name: "rw"})
			return stripHeader(r), err
		}},
		{"role get of one's own role", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.auth.RoleGet(ctx, &pb.AuthRoleGetRequest{Role: user})
			return stripHeader(r), err
		}},
		{"role get of another role", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.auth.RoleGet(ctx, &pb.AuthRoleGetRequest{Role: "rw"})
			return stripHeader(r), err
		}},
		{"watch inside", false, false, watchCreate("/in/", "/in0")},
		{"watch outside", false, false, watchCreate("/out/", "/out0")},
		{"watch a single key permission", false, false, watchCreate("k1", "")},
		// Last: a change of the auth store makes the tokens issued before it old.
		{"role add", false, false, func(ctx context.Context, a authAPI) (proto.Message, error) {
			r, err := a.auth.RoleAdd(ctx, &pb.AuthRoleAddRequest{Name: "made-by-" + user})
			return stripHeader(r), err
		}},
	}
	for i := range steps {
		switch steps[i].name {
		case "compact", "status", "hash kv", "auth status", "lease grant", "lease leases", "role get of one's own role",
			"lease time to live with keys inside", "lease time to live with keys outside", "lease time to live without keys",
			// 3.4 left the leases of a txn's puts and of keep-alives unchecked.
			"lock with a lease holding a key outside", "lease keep-alive of a lease holding keys inside",
			"lease keep-alive of a lease holding a key outside", "lease keep-alive of a lease that does not exist":
			steps[i].since35 = true
		}
	}
	return steps
}

// keepAliveOnce sends one keep-alive on a stream of its own and answers its answer.
func keepAliveOnce(id int64) func(ctx context.Context, a authAPI) (proto.Message, error) {
	return func(ctx context.Context, a authAPI) (proto.Message, error) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		s, err := a.lease.LeaseKeepAlive(ctx)
		if err != nil {
			return nil, err
		}
		if err := s.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
			return nil, err
		}
		return s.Recv()
	}
}

// watchCreate creates a watch and answers its first response, with what can differ
// between servers (IDs, header) zeroed.
func watchCreate(key, end string) func(ctx context.Context, a authAPI) (proto.Message, error) {
	return func(ctx context.Context, a authAPI) (proto.Message, error) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		s, err := a.watch.Watch(ctx)
		if err != nil {
			return nil, err
		}
		cr := &pb.WatchCreateRequest{Key: []byte(key)}
		if end != "" {
			cr.RangeEnd = []byte(end)
		}
		if err := s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: cr}}); err != nil {
			return nil, err
		}
		r, err := s.Recv()
		if err != nil {
			return nil, err
		}
		r.Header = nil
		if r.WatchId >= 0 {
			r.WatchId = 0
		}
		return r, nil
	}
}

// TestDifferentialAuthMatrix sends every RPC, for users with no, read, write and
// readwrite permission inside and outside their ranges, for root and for no user at
// all, to the target and to a real etcd set up alike, and requires the same answer
// from both: the same errors (code and message) and, where allowed, the same result.
func TestDifferentialAuthMatrix(t *testing.T) {
	t.Parallel()
	kind := harness.MustTarget(t)
	target := harness.Start(t, kind, harness.Options{Name: "auth-matrix-target"})
	oracle := harness.StartEtcd(t, harness.Options{Name: "auth-matrix-oracle"})
	tAPI := newAuthAPI(etcdclient.NewClient(t, target).ActiveConnection())
	oAPI := newAuthAPI(etcdclient.NewClient(t, oracle).ActiveConnection())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	authFixture(t, ctx, tAPI)
	authFixture(t, ctx, oAPI)

	token := func(a authAPI, user string) string {
		if user == "" {
			return ""
		}
		r, err := a.auth.Authenticate(ctx, &pb.AuthenticateRequest{Name: user, Password: user + "-pw"})
		if err != nil {
			t.Fatalf("authenticate %s: %v", user, err)
		}
		return r.Token
	}
	old34 := strings.Contains(harness.EtcdVersion(), " 3.4.")
	checked := 0
	for _, user := range []string{"", "none", "reader", "writer", "rw", "split", "root"} {
		tt, ot := token(tAPI, user), token(oAPI, user)
		for _, s := range authMatrix(user) {
			if s.since35 && old34 {
				continue
			}
			sctx, scancel := context.WithTimeout(ctx, 15*time.Second)
			rt, et := s.call(as(sctx, tt), tAPI)
			ro, eo := s.call(as(sctx, ot), oAPI)
			scancel()
			if s.errOnly {
				rt, ro = nil, nil
				if et == nil && eo == nil {
					checked++
					continue
				}
			}
			if msg := compareResults(string(kind), "etcd(oracle)", rt, et, ro, eo); msg != "" {
				t.Errorf("user %q, %s: %s", user, s.name, msg)
			}
			checked++
		}
	}
	t.Logf("%d decisions compared", checked)

	// Where etcd ends an Observe stream without a word when its read is denied, the
	// gateway answers why.
	if kind == harness.KindKvmesh {
		s, err := tAPI.recipes.election.Observe(as(ctx, token(tAPI, "none")), &elpb.LeaderRequest{Name: []byte("/in/el")})
		if err == nil {
			_, err = s.Recv()
		}
		if err == nil || !strings.Contains(err.Error(), "etcdserver: permission denied") {
			t.Errorf("observe without permission: %v, want permission denied", err)
		}
	}
	// A token that was never issued, and a malformed authorization header.
	for _, tok := range []string{"not-a-token", "Bearer x.y.z"} {
		_, et := tAPI.kv.Range(as(ctx, tok), &pb.RangeRequest{Key: []byte("k1")})
		_, eo := oAPI.kv.Range(as(ctx, tok), &pb.RangeRequest{Key: []byte("k1")})
		if msg := compareResults(string(kind), "etcd(oracle)", nil, et, nil, eo); msg != "" {
			t.Errorf("token %q: %s", tok, msg)
		}
	}
	// Authentication failures.
	for _, c := range [][2]string{{"rw", "wrong"}, {"nobody", "x"}, {"", ""}} {
		_, et := tAPI.auth.Authenticate(ctx, &pb.AuthenticateRequest{Name: c[0], Password: c[1]})
		_, eo := oAPI.auth.Authenticate(ctx, &pb.AuthenticateRequest{Name: c[0], Password: c[1]})
		if msg := compareResults(string(kind), "etcd(oracle)", nil, et, nil, eo); msg != "" {
			t.Errorf("authenticate %q/%q: %s", c[0], c[1], msg)
		}
	}
}
