package gateway

import (
	"github.com/kvmesh/kvmesh/libs/authz"
)

// Namespaces (see package namespace): the prefix of a request is the gateway's
// (KVMESH_GATEWAY_NAMESPACE) followed by its user's tenant namespace
// (kvmesh.tenant.v1, from the auth store). Permissions are checked on the prefixed
// keys, so a tenant's roles name the keys as they are stored.

// prefix is the namespace of a request decided as ai against s.
func (g *Gateway) prefix(s *authz.Store, ai *authz.Info) []byte {
	u := s.Namespace(ai)
	if len(u) == 0 {
		return g.namespace
	}
	if len(g.namespace) == 0 {
		return u
	}
	return append(append(make([]byte, 0, len(g.namespace)+len(u)), g.namespace...), u...)
}
