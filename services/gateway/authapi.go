package gateway

import (
	"context"
	"errors"
	"net"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/grpc/peer"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
)

// etcd's Auth service. Authenticate goes to a replica, which checks the password and
// signs the token; every other RPC is decided here (root only, but for a user reading
// itself or one of its roles, as etcd) and run by a replica: changes through Raft,
// reads after a linearizable read.

// admin is etcd's check of root-only requests.
func admin(s *authz.Store, ai *authz.Info) error { return s.IsAdminPermitted(ai) }

func userName(ai *authz.Info) string {
	if ai == nil {
		return ""
	}
	return ai.User
}

// authCall decides and runs one Auth RPC on the leader.
func (g *Gateway) authCall(ctx context.Context, chk check, req *replicav1.AuthRequest) (*replicav1.AuthResponse, error) {
	resp, err := authorized(ctx, g, chk, func(ctx context.Context) (*replicav1.AuthResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.AuthCall, req)
	})
	if err == nil && authz.IsChange(req) {
		// This gateway's next request sees the change without waiting for the
		// replica to refuse a stale decision.
		g.auth.refresh(ctx)
	}
	return resp, err
}

type peerAddrKey struct{}

func withPeerAddr(ctx context.Context, addr string) context.Context {
	if host, _, err := net.SplitHostPort(addr); err == nil {
		addr = host
	}
	return context.WithValue(ctx, peerAddrKey{}, addr)
}

// Authenticate is refused without asking a replica while the user or the client's
// address has failed too often (see failureLimiter).
func (g *Gateway) Authenticate(ctx context.Context, r *pb.AuthenticateRequest) (*pb.AuthenticateResponse, error) {
	addr, _ := ctx.Value(peerAddrKey{}).(string)
	userKey, addrKey := "user\x00"+r.GetName(), "addr\x00"+addr
	if !g.auth.failures.allowed(time.Now(), userKey, addrKey) {
		g.m.authThrottled.Inc()
		return nil, etcderr.ErrTooManyAuthFailures
	}
	resp, err := call(ctx, g, spread, replicaapi.API.Authenticate, r)
	if err != nil {
		if errors.Is(err, etcderr.ErrAuthFailed) {
			g.auth.failures.failed(time.Now(), userKey, addrKey)
			g.m.authFailures.Inc()
		}
		return nil, err
	}
	g.auth.failures.succeeded(userKey)
	return resp, nil
}

func (g *Gateway) AuthEnable(ctx context.Context, r *pb.AuthEnableRequest) (*pb.AuthEnableResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_AuthEnable{AuthEnable: r}})
	return resp.GetAuthEnable(), err
}

func (g *Gateway) AuthDisable(ctx context.Context, r *pb.AuthDisableRequest) (*pb.AuthDisableResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_AuthDisable{AuthDisable: r}})
	return resp.GetAuthDisable(), err
}

func (g *Gateway) AuthStatus(ctx context.Context, r *pb.AuthStatusRequest) (*pb.AuthStatusResponse, error) {
	resp, err := g.authCall(ctx, allow, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_AuthStatus{AuthStatus: r}})
	return resp.GetAuthStatus(), err
}

func (g *Gateway) UserAdd(ctx context.Context, r *pb.AuthUserAddRequest) (*pb.AuthUserAddResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_UserAdd{UserAdd: r}})
	return resp.GetUserAdd(), err
}

// adminOrSelf is the check of reads about the user name: root, or that user.
func adminOrSelf(name string) check {
	return func(s *authz.Store, ai *authz.Info) error {
		if err := s.IsAdminPermitted(ai); err != nil && name != userName(ai) {
			return err
		}
		return nil
	}
}

func (g *Gateway) UserGet(ctx context.Context, r *pb.AuthUserGetRequest) (*pb.AuthUserGetResponse, error) {
	resp, err := g.authCall(ctx, adminOrSelf(r.GetName()), &replicav1.AuthRequest{Request: &replicav1.AuthRequest_UserGet{UserGet: r}})
	return resp.GetUserGet(), err
}

func (g *Gateway) UserList(ctx context.Context, r *pb.AuthUserListRequest) (*pb.AuthUserListResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_UserList{UserList: r}})
	return resp.GetUserList(), err
}

func (g *Gateway) UserDelete(ctx context.Context, r *pb.AuthUserDeleteRequest) (*pb.AuthUserDeleteResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_UserDelete{UserDelete: r}})
	return resp.GetUserDelete(), err
}

func (g *Gateway) UserChangePassword(ctx context.Context, r *pb.AuthUserChangePasswordRequest) (*pb.AuthUserChangePasswordResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_UserChangePassword{UserChangePassword: r}})
	return resp.GetUserChangePassword(), err
}

func (g *Gateway) UserGrantRole(ctx context.Context, r *pb.AuthUserGrantRoleRequest) (*pb.AuthUserGrantRoleResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_UserGrantRole{UserGrantRole: r}})
	return resp.GetUserGrantRole(), err
}

func (g *Gateway) UserRevokeRole(ctx context.Context, r *pb.AuthUserRevokeRoleRequest) (*pb.AuthUserRevokeRoleResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_UserRevokeRole{UserRevokeRole: r}})
	return resp.GetUserRevokeRole(), err
}

func (g *Gateway) RoleAdd(ctx context.Context, r *pb.AuthRoleAddRequest) (*pb.AuthRoleAddResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_RoleAdd{RoleAdd: r}})
	return resp.GetRoleAdd(), err
}

func (g *Gateway) RoleGet(ctx context.Context, r *pb.AuthRoleGetRequest) (*pb.AuthRoleGetResponse, error) {
	chk := func(s *authz.Store, ai *authz.Info) error {
		if err := s.IsAdminPermitted(ai); err != nil && !s.HasRole(userName(ai), r.GetRole()) {
			return err
		}
		return nil
	}
	resp, err := g.authCall(ctx, chk, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_RoleGet{RoleGet: r}})
	return resp.GetRoleGet(), err
}

func (g *Gateway) RoleList(ctx context.Context, r *pb.AuthRoleListRequest) (*pb.AuthRoleListResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_RoleList{RoleList: r}})
	return resp.GetRoleList(), err
}

func (g *Gateway) RoleDelete(ctx context.Context, r *pb.AuthRoleDeleteRequest) (*pb.AuthRoleDeleteResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_RoleDelete{RoleDelete: r}})
	return resp.GetRoleDelete(), err
}

func (g *Gateway) RoleGrantPermission(ctx context.Context, r *pb.AuthRoleGrantPermissionRequest) (*pb.AuthRoleGrantPermissionResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_RoleGrantPermission{RoleGrantPermission: r}})
	return resp.GetRoleGrantPermission(), err
}

func (g *Gateway) RoleRevokePermission(ctx context.Context, r *pb.AuthRoleRevokePermissionRequest) (*pb.AuthRoleRevokePermissionResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_RoleRevokePermission{RoleRevokePermission: r}})
	return resp.GetRoleRevokePermission(), err
}

// grpcAuth serves etcdserverpb.Auth over grpc-go.
type grpcAuth struct {
	pb.UnimplementedAuthServer
	g *Gateway
}

func (s grpcAuth) Authenticate(ctx context.Context, r *pb.AuthenticateRequest) (*pb.AuthenticateResponse, error) {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		ctx = withPeerAddr(ctx, p.Addr.String())
	}
	return grpcUnary(ctx, r, s.g.Authenticate)
}
func (s grpcAuth) AuthEnable(ctx context.Context, r *pb.AuthEnableRequest) (*pb.AuthEnableResponse, error) {
	return grpcUnary(ctx, r, s.g.AuthEnable)
}
func (s grpcAuth) AuthDisable(ctx context.Context, r *pb.AuthDisableRequest) (*pb.AuthDisableResponse, error) {
	return grpcUnary(ctx, r, s.g.AuthDisable)
}
func (s grpcAuth) AuthStatus(ctx context.Context, r *pb.AuthStatusRequest) (*pb.AuthStatusResponse, error) {
	return grpcUnary(ctx, r, s.g.AuthStatus)
}
func (s grpcAuth) UserAdd(ctx context.Context, r *pb.AuthUserAddRequest) (*pb.AuthUserAddResponse, error) {
	return grpcUnary(ctx, r, s.g.UserAdd)
}
func (s grpcAuth) UserGet(ctx context.Context, r *pb.AuthUserGetRequest) (*pb.AuthUserGetResponse, error) {
	return grpcUnary(ctx, r, s.g.UserGet)
}
func (s grpcAuth) UserList(ctx context.Context, r *pb.AuthUserListRequest) (*pb.AuthUserListResponse, error) {
	return grpcUnary(ctx, r, s.g.UserList)
}
func (s grpcAuth) UserDelete(ctx context.Context, r *pb.AuthUserDeleteRequest) (*pb.AuthUserDeleteResponse, error) {
	return grpcUnary(ctx, r, s.g.UserDelete)
}
func (s grpcAuth) UserChangePassword(ctx context.Context, r *pb.AuthUserChangePasswordRequest) (*pb.AuthUserChangePasswordResponse, error) {
	return grpcUnary(ctx, r, s.g.UserChangePassword)
}
func (s grpcAuth) UserGrantRole(ctx context.Context, r *pb.AuthUserGrantRoleRequest) (*pb.AuthUserGrantRoleResponse, error) {
	return grpcUnary(ctx, r, s.g.UserGrantRole)
}
func (s grpcAuth) UserRevokeRole(ctx context.Context, r *pb.AuthUserRevokeRoleRequest) (*pb.AuthUserRevokeRoleResponse, error) {
	return grpcUnary(ctx, r, s.g.UserRevokeRole)
}
func (s grpcAuth) RoleAdd(ctx context.Context, r *pb.AuthRoleAddRequest) (*pb.AuthRoleAddResponse, error) {
	return grpcUnary(ctx, r, s.g.RoleAdd)
}
func (s grpcAuth) RoleGet(ctx context.Context, r *pb.AuthRoleGetRequest) (*pb.AuthRoleGetResponse, error) {
	return grpcUnary(ctx, r, s.g.RoleGet)
}
func (s grpcAuth) RoleList(ctx context.Context, r *pb.AuthRoleListRequest) (*pb.AuthRoleListResponse, error) {
	return grpcUnary(ctx, r, s.g.RoleList)
}
func (s grpcAuth) RoleDelete(ctx context.Context, r *pb.AuthRoleDeleteRequest) (*pb.AuthRoleDeleteResponse, error) {
	return grpcUnary(ctx, r, s.g.RoleDelete)
}
func (s grpcAuth) RoleGrantPermission(ctx context.Context, r *pb.AuthRoleGrantPermissionRequest) (*pb.AuthRoleGrantPermissionResponse, error) {
	return grpcUnary(ctx, r, s.g.RoleGrantPermission)
}
func (s grpcAuth) RoleRevokePermission(ctx context.Context, r *pb.AuthRoleRevokePermissionRequest) (*pb.AuthRoleRevokePermissionResponse, error) {
	return grpcUnary(ctx, r, s.g.RoleRevokePermission)
}

// connectAuth serves etcdserverpb.Auth over Connect, gRPC-Web and gRPC on net/http.
type connectAuth struct{ g *Gateway }

func (h connectAuth) Authenticate(ctx context.Context, r *connect.Request[pb.AuthenticateRequest]) (*connect.Response[pb.AuthenticateResponse], error) {
	return unary(withPeerAddr(ctx, r.Peer().Addr), r, h.g.Authenticate)
}
func (h connectAuth) AuthEnable(ctx context.Context, r *connect.Request[pb.AuthEnableRequest]) (*connect.Response[pb.AuthEnableResponse], error) {
	return unary(ctx, r, h.g.AuthEnable)
}
func (h connectAuth) AuthDisable(ctx context.Context, r *connect.Request[pb.AuthDisableRequest]) (*connect.Response[pb.AuthDisableResponse], error) {
	return unary(ctx, r, h.g.AuthDisable)
}
func (h connectAuth) AuthStatus(ctx context.Context, r *connect.Request[pb.AuthStatusRequest]) (*connect.Response[pb.AuthStatusResponse], error) {
	return unary(ctx, r, h.g.AuthStatus)
}
func (h connectAuth) UserAdd(ctx context.Context, r *connect.Request[pb.AuthUserAddRequest]) (*connect.Response[pb.AuthUserAddResponse], error) {
	return unary(ctx, r, h.g.UserAdd)
}
func (h connectAuth) UserGet(ctx context.Context, r *connect.Request[pb.AuthUserGetRequest]) (*connect.Response[pb.AuthUserGetResponse], error) {
	return unary(ctx, r, h.g.UserGet)
}
func (h connectAuth) UserList(ctx context.Context, r *connect.Request[pb.AuthUserListRequest]) (*connect.Response[pb.AuthUserListResponse], error) {
	return unary(ctx, r, h.g.UserList)
}
func (h connectAuth) UserDelete(ctx context.Context, r *connect.Request[pb.AuthUserDeleteRequest]) (*connect.Response[pb.AuthUserDeleteResponse], error) {
	return unary(ctx, r, h.g.UserDelete)
}
func (h connectAuth) UserChangePassword(ctx context.Context, r *connect.Request[pb.AuthUserChangePasswordRequest]) (*connect.Response[pb.AuthUserChangePasswordResponse], error) {
	return unary(ctx, r, h.g.UserChangePassword)
}
func (h connectAuth) UserGrantRole(ctx context.Context, r *connect.Request[pb.AuthUserGrantRoleRequest]) (*connect.Response[pb.AuthUserGrantRoleResponse], error) {
	return unary(ctx, r, h.g.UserGrantRole)
}
func (h connectAuth) UserRevokeRole(ctx context.Context, r *connect.Request[pb.AuthUserRevokeRoleRequest]) (*connect.Response[pb.AuthUserRevokeRoleResponse], error) {
	return unary(ctx, r, h.g.UserRevokeRole)
}
func (h connectAuth) RoleAdd(ctx context.Context, r *connect.Request[pb.AuthRoleAddRequest]) (*connect.Response[pb.AuthRoleAddResponse], error) {
	return unary(ctx, r, h.g.RoleAdd)
}
func (h connectAuth) RoleGet(ctx context.Context, r *connect.Request[pb.AuthRoleGetRequest]) (*connect.Response[pb.AuthRoleGetResponse], error) {
	return unary(ctx, r, h.g.RoleGet)
}
func (h connectAuth) RoleList(ctx context.Context, r *connect.Request[pb.AuthRoleListRequest]) (*connect.Response[pb.AuthRoleListResponse], error) {
	return unary(ctx, r, h.g.RoleList)
}
func (h connectAuth) RoleDelete(ctx context.Context, r *connect.Request[pb.AuthRoleDeleteRequest]) (*connect.Response[pb.AuthRoleDeleteResponse], error) {
	return unary(ctx, r, h.g.RoleDelete)
}
func (h connectAuth) RoleGrantPermission(ctx context.Context, r *connect.Request[pb.AuthRoleGrantPermissionRequest]) (*connect.Response[pb.AuthRoleGrantPermissionResponse], error) {
	return unary(ctx, r, h.g.RoleGrantPermission)
}
func (h connectAuth) RoleRevokePermission(ctx context.Context, r *connect.Request[pb.AuthRoleRevokePermissionRequest]) (*connect.Response[pb.AuthRoleRevokePermissionResponse], error) {
	return unary(ctx, r, h.g.RoleRevokePermission)
}
