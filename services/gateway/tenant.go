package gateway

import (
	"context"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	tenantv1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/tenant/v1"
)

// kvmesh.tenant.v1.TenantService: users' namespaces (see namespace.go), kept in the
// auth store beside the users, changed through Raft like any auth change.

func (g *Gateway) SetUserNamespace(ctx context.Context, r *tenantv1.SetUserNamespaceRequest) (*tenantv1.SetUserNamespaceResponse, error) {
	resp, err := g.authCall(ctx, admin, &replicav1.AuthRequest{Request: &replicav1.AuthRequest_UserSetNamespace{UserSetNamespace: r}})
	return resp.GetUserSetNamespace(), err
}

func (g *Gateway) GetUserNamespace(ctx context.Context, r *tenantv1.GetUserNamespaceRequest) (*tenantv1.GetUserNamespaceResponse, error) {
	resp, err := g.authCall(ctx, adminOrSelf(r.GetName()), &replicav1.AuthRequest{Request: &replicav1.AuthRequest_UserGetNamespace{UserGetNamespace: r}})
	return resp.GetUserGetNamespace(), err
}
