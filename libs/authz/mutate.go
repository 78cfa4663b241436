package authz

import (
	"bytes"
	"encoding/base64"
	"slices"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/api/gen/authpb"
	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	tenantv1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/tenant/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// IsChange tells whether an Auth request changes the store (and so goes through
// Raft); the others only read it.
func IsChange(req *replicav1.AuthRequest) bool {
	switch req.GetRequest().(type) {
	case *replicav1.AuthRequest_AuthStatus, *replicav1.AuthRequest_UserGet, *replicav1.AuthRequest_UserList,
		*replicav1.AuthRequest_RoleGet, *replicav1.AuthRequest_RoleList, *replicav1.AuthRequest_UserGetNamespace:
		return false
	}
	return true
}

// Apply runs one Auth request against st, as etcd's auth store does, and answers the
// new state (st itself when nothing changed; st is never modified). Passwords arrive
// already hashed (hashed_password, base64 of the bcrypt hash), as etcd proposes them.
func Apply(st *replicav1.AuthState, req *replicav1.AuthRequest) (*replicav1.AuthState, *replicav1.AuthResponse, error) {
	if st == nil {
		st = &replicav1.AuthState{}
	}
	next := proto.Clone(st).(*replicav1.AuthState)
	commit := func() { next.Revision++ }
	resp := &replicav1.AuthResponse{}
	switch r := req.GetRequest().(type) {
	case *replicav1.AuthRequest_AuthEnable:
		if st.GetEnabled() {
			resp.Response = &replicav1.AuthResponse_AuthEnable{AuthEnable: &pb.AuthEnableResponse{}}
			return st, resp, nil
		}
		u := findUser(next, RootUser)
		if u == nil {
			return st, nil, etcderr.ErrRootUserNotExist
		}
		if !slices.Contains(u.GetRoles(), RootRole) {
			return st, nil, etcderr.ErrRootRoleNotExist
		}
		next.Enabled = true
		if len(next.GetSigningSeed()) == 0 {
			next.SigningSeed = req.GetSigningSeed()
		}
		resp.Response = &replicav1.AuthResponse_AuthEnable{AuthEnable: &pb.AuthEnableResponse{}}
	case *replicav1.AuthRequest_AuthDisable:
		resp.Response = &replicav1.AuthResponse_AuthDisable{AuthDisable: &pb.AuthDisableResponse{}}
		if !st.GetEnabled() {
			return st, resp, nil
		}
		next.Enabled = false
		commit()
	case *replicav1.AuthRequest_AuthStatus:
		resp.Response = &replicav1.AuthResponse_AuthStatus{AuthStatus: &pb.AuthStatusResponse{Enabled: st.GetEnabled(), AuthRevision: st.GetRevision()}}
		return st, resp, nil
	case *replicav1.AuthRequest_UserAdd:
		m := r.UserAdd
		if m.GetName() == "" {
			return st, nil, etcderr.ErrUserEmpty
		}
		if findUser(next, m.GetName()) != nil {
			return st, nil, etcderr.ErrUserAlreadyExist
		}
		opts := m.GetOptions()
		if opts == nil {
			opts = &authpb.UserAddOptions{}
		}
		u := &authpb.User{Name: []byte(m.GetName()), Options: opts}
		if !opts.GetNoPassword() {
			h, err := base64.StdEncoding.DecodeString(m.GetHashedPassword())
			if err != nil {
				return st, nil, etcderr.ErrNoPasswordUser
			}
			u.Password = h
		}
		next.Users = insertUser(next.GetUsers(), u)
		commit()
		resp.Response = &replicav1.AuthResponse_UserAdd{UserAdd: &pb.AuthUserAddResponse{}}
	case *replicav1.AuthRequest_UserDelete:
		m := r.UserDelete
		if st.GetEnabled() && m.GetName() == RootUser {
			return st, nil, etcderr.ErrInvalidAuthMgmt
		}
		i := userIndex(next, m.GetName())
		if i < 0 {
			return st, nil, etcderr.ErrUserNotFound
		}
		next.Users = slices.Delete(next.Users, i, i+1)
		next.Namespaces = setNamespace(next.GetNamespaces(), m.GetName(), nil)
		commit()
		resp.Response = &replicav1.AuthResponse_UserDelete{UserDelete: &pb.AuthUserDeleteResponse{}}
	case *replicav1.AuthRequest_UserSetNamespace:
		m := r.UserSetNamespace
		if m.GetName() == "" {
			return st, nil, etcderr.ErrUserEmpty
		}
		if findUser(next, m.GetName()) == nil {
			return st, nil, etcderr.ErrUserNotFound
		}
		next.Namespaces = setNamespace(next.GetNamespaces(), m.GetName(), m.GetNamespace())
		commit()
		resp.Response = &replicav1.AuthResponse_UserSetNamespace{UserSetNamespace: &tenantv1.SetUserNamespaceResponse{}}
	case *replicav1.AuthRequest_UserGetNamespace:
		m := r.UserGetNamespace
		if findUser(st, m.GetName()) == nil {
			return st, nil, etcderr.ErrUserNotFound
		}
		resp.Response = &replicav1.AuthResponse_UserGetNamespace{UserGetNamespace: &tenantv1.GetUserNamespaceResponse{
			Namespace: namespaceOf(st.GetNamespaces(), m.GetName())}}
		return st, resp, nil
	case *replicav1.AuthRequest_UserChangePassword:
		m := r.UserChangePassword
		u := findUser(next, m.GetName())
		if u == nil {
			return st, nil, etcderr.ErrUserNotFound
		}
		if !u.GetOptions().GetNoPassword() {
			h, err := base64.StdEncoding.DecodeString(m.GetHashedPassword())
			if err != nil {
				return st, nil, etcderr.ErrNoPasswordUser
			}
			u.Password = h
		} else {
			u.Password = nil
		}
		commit()
		resp.Response = &replicav1.AuthResponse_UserChangePassword{UserChangePassword: &pb.AuthUserChangePasswordResponse{}}
	case *replicav1.AuthRequest_UserGrantRole:
		m := r.UserGrantRole
		u := findUser(next, m.GetUser())
		if u == nil {
			return st, nil, etcderr.ErrUserNotFound
		}
		if m.GetRole() != RootRole && findRole(next, m.GetRole()) == nil {
			return st, nil, etcderr.ErrRoleNotFound
		}
		resp.Response = &replicav1.AuthResponse_UserGrantRole{UserGrantRole: &pb.AuthUserGrantRoleResponse{}}
		if slices.Contains(u.GetRoles(), m.GetRole()) {
			return st, resp, nil
		}
		u.Roles = append(u.Roles, m.GetRole())
		sort.Strings(u.Roles)
		commit()
	case *replicav1.AuthRequest_UserRevokeRole:
		m := r.UserRevokeRole
		if st.GetEnabled() && m.GetName() == RootUser && m.GetRole() == RootRole {
			return st, nil, etcderr.ErrInvalidAuthMgmt
		}
		u := findUser(next, m.GetName())
		if u == nil {
			return st, nil, etcderr.ErrUserNotFound
		}
		i := slices.Index(u.GetRoles(), m.GetRole())
		if i < 0 {
			return st, nil, etcderr.ErrRoleNotGranted
		}
		u.Roles = slices.DeleteFunc(u.Roles, func(r string) bool { return r == m.GetRole() })
		commit()
		resp.Response = &replicav1.AuthResponse_UserRevokeRole{UserRevokeRole: &pb.AuthUserRevokeRoleResponse{}}
	case *replicav1.AuthRequest_UserGet:
		u := findUser(st, r.UserGet.GetName())
		if u == nil {
			return st, nil, etcderr.ErrUserNotFound
		}
		resp.Response = &replicav1.AuthResponse_UserGet{UserGet: &pb.AuthUserGetResponse{Roles: slices.Clone(u.GetRoles())}}
		return st, resp, nil
	case *replicav1.AuthRequest_UserList:
		out := &pb.AuthUserListResponse{Users: make([]string, 0, len(st.GetUsers()))}
		for _, u := range st.GetUsers() {
			out.Users = append(out.Users, string(u.GetName()))
		}
		resp.Response = &replicav1.AuthResponse_UserList{UserList: out}
		return st, resp, nil
	case *replicav1.AuthRequest_RoleAdd:
		m := r.RoleAdd
		if m.GetName() == "" {
			return st, nil, etcderr.ErrRoleEmpty
		}
		if findRole(next, m.GetName()) != nil {
			return st, nil, etcderr.ErrRoleAlreadyExist
		}
		role := &authpb.Role{Name: []byte(m.GetName())}
		i, _ := slices.BinarySearchFunc(next.Roles, role.Name, func(r *authpb.Role, n []byte) int { return bytes.Compare(r.GetName(), n) })
		next.Roles = slices.Insert(next.Roles, i, role)
		commit()
		resp.Response = &replicav1.AuthResponse_RoleAdd{RoleAdd: &pb.AuthRoleAddResponse{}}
	case *replicav1.AuthRequest_RoleGet:
		role := findRole(st, r.RoleGet.GetRole())
		if role == nil {
			return st, nil, etcderr.ErrRoleNotFound
		}
		out := &pb.AuthRoleGetResponse{}
		if string(role.GetName()) == RootRole {
			out.Perm = []*authpb.Permission{{PermType: authpb.Permission_READWRITE, Key: []byte{}, RangeEnd: []byte{0}}}
		} else {
			for _, p := range role.GetKeyPermission() {
				out.Perm = append(out.Perm, proto.Clone(p).(*authpb.Permission))
			}
		}
		resp.Response = &replicav1.AuthResponse_RoleGet{RoleGet: out}
		return st, resp, nil
	case *replicav1.AuthRequest_RoleList:
		out := &pb.AuthRoleListResponse{Roles: make([]string, 0, len(st.GetRoles()))}
		for _, r := range st.GetRoles() {
			out.Roles = append(out.Roles, string(r.GetName()))
		}
		resp.Response = &replicav1.AuthResponse_RoleList{RoleList: out}
		return st, resp, nil
	case *replicav1.AuthRequest_RoleDelete:
		m := r.RoleDelete
		if st.GetEnabled() && m.GetRole() == RootRole {
			return st, nil, etcderr.ErrInvalidAuthMgmt
		}
		i := slices.IndexFunc(next.Roles, func(r *authpb.Role) bool { return string(r.GetName()) == m.GetRole() })
		if i < 0 {
			return st, nil, etcderr.ErrRoleNotFound
		}
		next.Roles = slices.Delete(next.Roles, i, i+1)
		for _, u := range next.Users {
			u.Roles = slices.DeleteFunc(u.Roles, func(r string) bool { return r == m.GetRole() })
		}
		commit()
		resp.Response = &replicav1.AuthResponse_RoleDelete{RoleDelete: &pb.AuthRoleDeleteResponse{}}
	case *replicav1.AuthRequest_RoleGrantPermission:
		m := r.RoleGrantPermission
		p := m.GetPerm()
		if p == nil {
			return st, nil, etcderr.ErrPermissionNotGiven
		}
		if !validPermissionRange(p.GetKey(), p.GetRangeEnd()) {
			return st, nil, etcderr.ErrInvalidAuthMgmt
		}
		role := findRole(next, m.GetName())
		if role == nil {
			return st, nil, etcderr.ErrRoleNotFound
		}
		idx := sort.Search(len(role.KeyPermission), func(i int) bool {
			return bytes.Compare(role.KeyPermission[i].GetKey(), p.GetKey()) >= 0
		})
		if idx < len(role.KeyPermission) && bytes.Equal(role.KeyPermission[idx].GetKey(), p.GetKey()) &&
			bytes.Equal(role.KeyPermission[idx].GetRangeEnd(), p.GetRangeEnd()) {
			role.KeyPermission[idx].PermType = p.GetPermType()
		} else {
			role.KeyPermission = append(role.KeyPermission, &authpb.Permission{Key: p.GetKey(), RangeEnd: p.GetRangeEnd(), PermType: p.GetPermType()})
			sort.Sort(permSlice(role.KeyPermission))
		}
		commit()
		resp.Response = &replicav1.AuthResponse_RoleGrantPermission{RoleGrantPermission: &pb.AuthRoleGrantPermissionResponse{}}
	case *replicav1.AuthRequest_RoleRevokePermission:
		m := r.RoleRevokePermission
		role := findRole(next, m.GetRole())
		if role == nil {
			return st, nil, etcderr.ErrRoleNotFound
		}
		n := len(role.KeyPermission)
		role.KeyPermission = slices.DeleteFunc(role.KeyPermission, func(p *authpb.Permission) bool {
			return bytes.Equal(p.GetKey(), m.GetKey()) && bytes.Equal(p.GetRangeEnd(), m.GetRangeEnd())
		})
		if len(role.KeyPermission) == n {
			return st, nil, etcderr.ErrPermissionNotGranted
		}
		commit()
		resp.Response = &replicav1.AuthResponse_RoleRevokePermission{RoleRevokePermission: &pb.AuthRoleRevokePermissionResponse{}}
	default:
		return st, nil, etcderr.ErrInvalidAuthMgmt
	}
	return next, resp, nil
}

// permSlice sorts permissions by key, as etcd does (sort.Sort, not stable).
type permSlice []*authpb.Permission

func (p permSlice) Len() int           { return len(p) }
func (p permSlice) Less(i, j int) bool { return bytes.Compare(p[i].GetKey(), p[j].GetKey()) < 0 }
func (p permSlice) Swap(i, j int)      { p[i], p[j] = p[j], p[i] }

// validPermissionRange is etcd's isValidPermissionRange.
func validPermissionRange(key, rangeEnd []byte) bool {
	if len(key) == 0 {
		return false
	}
	if len(rangeEnd) == 0 {
		return true
	}
	return compare(key, rangeEnd) < 0 || isOpenEnded(rangeEnd)
}

func userIndex(st *replicav1.AuthState, name string) int {
	i, ok := slices.BinarySearchFunc(st.GetUsers(), name, func(u *authpb.User, n string) int { return bytes.Compare(u.GetName(), []byte(n)) })
	if !ok {
		return -1
	}
	return i
}

// setNamespace answers ns with user's namespace set to prefix (removed when empty),
// kept sorted by user.
func setNamespace(ns []*replicav1.UserNamespace, user string, prefix []byte) []*replicav1.UserNamespace {
	i, found := slices.BinarySearchFunc(ns, user, func(x *replicav1.UserNamespace, u string) int { return strings.Compare(x.GetUser(), u) })
	switch {
	case found && len(prefix) == 0:
		return slices.Delete(ns, i, i+1)
	case found:
		ns[i] = &replicav1.UserNamespace{User: user, Prefix: prefix}
		return ns
	case len(prefix) == 0:
		return ns
	}
	return slices.Insert(ns, i, &replicav1.UserNamespace{User: user, Prefix: prefix})
}

func namespaceOf(ns []*replicav1.UserNamespace, user string) []byte {
	if i, found := slices.BinarySearchFunc(ns, user, func(x *replicav1.UserNamespace, u string) int { return strings.Compare(x.GetUser(), u) }); found {
		return ns[i].GetPrefix()
	}
	return nil
}

func findUser(st *replicav1.AuthState, name string) *authpb.User {
	if i := userIndex(st, name); i >= 0 {
		return st.Users[i]
	}
	return nil
}

func insertUser(users []*authpb.User, u *authpb.User) []*authpb.User {
	i, _ := slices.BinarySearchFunc(users, u.GetName(), func(x *authpb.User, n []byte) int { return bytes.Compare(x.GetName(), n) })
	return slices.Insert(users, i, u)
}

func findRole(st *replicav1.AuthState, name string) *authpb.Role {
	i, ok := slices.BinarySearchFunc(st.GetRoles(), name, func(r *authpb.Role, n string) int { return bytes.Compare(r.GetName(), []byte(n)) })
	if !ok {
		return nil
	}
	return st.Roles[i]
}

// PasswordHash is the user's bcrypt hash, and whether the user may log in with a
// password at all (nil, false: no such user; nil, true with noPassword: a user that
// authenticates only by client certificate).
func PasswordHash(st *replicav1.AuthState, name string) (hash []byte, noPassword, found bool) {
	u := findUser(st, name)
	if u == nil {
		return nil, false, false
	}
	return u.GetPassword(), u.GetOptions().GetNoPassword(), true
}

// Public is st as gateways get it: no password hashes, no signing key, the public key.
func Public(st *replicav1.AuthState, publicKey []byte) *replicav1.AuthState {
	out := &replicav1.AuthState{Revision: st.GetRevision(), Enabled: st.GetEnabled(), Roles: st.GetRoles(), PublicKey: publicKey,
		Namespaces: st.GetNamespaces()}
	for _, u := range st.GetUsers() {
		out.Users = append(out.Users, &authpb.User{Name: u.GetName(), Roles: u.GetRoles(), Options: u.GetOptions()})
	}
	return out
}
