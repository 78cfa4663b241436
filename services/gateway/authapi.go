package gateway

import (
	"context"
	"errors"
	"time"

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
