// Package authz is etcd's access control as kvmesh shares it between replicas and
// gateways: the auth store's state (users, roles, their key permissions), the
// permission checks etcd makes, the signed tokens, and the stamp a gateway sends with
// every request so a replica can refuse one decided on a stale copy of the state.
//
// The checks follow etcd 3.7's auth store (server/auth/store.go, range_perm_cache.go)
// decision for decision, including its treatment of points, open-ended ranges and
// adjacent permissions; a differential test against etcd holds them to it.
package authz

import (
	"bytes"
	"crypto/ed25519"
	"slices"
	"sync/atomic"

	"github.com/kvmesh/kvmesh/api/gen/authpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// RootUser and RootRole are etcd's: the root role may do anything, and auth can only
// be enabled once the root user exists with the root role.
const (
	RootUser = "root"
	RootRole = "root"
)

// Info is who a request runs as: etcd's AuthInfo. Revision is the auth revision the
// user's token was issued at; 0 means no user.
type Info struct {
	User     string
	Revision uint64
}

// Store is one auth state, ready for checks. It is immutable: a change makes a new one.
type Store struct {
	Revision  uint64
	Enabled   bool
	PublicKey ed25519.PublicKey
	users     map[string]*user
	// namespaces are the users' tenant prefixes (kvmesh.tenant.v1); nil when none has one.
	namespaces map[string][]byte
	// anonymous is the decision without a user under this state, made once (Decision).
	anonymous atomic.Pointer[Decision]
}

// Namespace is the tenant prefix of the user ai names (nil: none, or no user).
func (s *Store) Namespace(ai *Info) []byte {
	if ai == nil || s.namespaces == nil {
		return nil
	}
	return s.namespaces[ai.User]
}

type user struct {
	name       string
	roles      []string
	noPassword bool
	root       bool
	read       []interval
	write      []interval
}

// interval is [begin, end) under etcd's "bytes affine" order, where an empty end is
// greater than every key (an open end).
type interval struct{ begin, end []byte }

// compare orders byte strings with the empty string greatest.
func compare(a, b []byte) int {
	switch {
	case len(a) == 0 && len(b) == 0:
		return 0
	case len(a) == 0:
		return 1
	case len(b) == 0:
		return -1
	}
	return bytes.Compare(a, b)
}

// overlaps is etcd's interval comparison (adt.Interval.Compare) answering 0.
func (q interval) overlaps(t interval) bool {
	left := compare(q.begin, t.begin) < 0 && compare(q.end, t.begin) <= 0
	right := compare(q.begin, t.end) >= 0
	return !left && !right
}

// point is the interval of one key: [key, key+"\x00").
func point(key []byte) interval {
	end := make([]byte, len(key)+1)
	copy(end, key)
	return interval{begin: key, end: end}
}

// permInterval is a permission's interval: a point when there is no range end, open
// when the range end is "\x00".
func permInterval(key, rangeEnd []byte) interval {
	if len(rangeEnd) == 0 {
		return point(key)
	}
	if isOpenEnded(rangeEnd) {
		return interval{begin: key}
	}
	return interval{begin: key, end: rangeEnd}
}

func isOpenEnded(rangeEnd []byte) bool { return len(rangeEnd) == 1 && rangeEnd[0] == 0 }

// contains is etcd's IntervalTree.Contains: the permissions that overlap q, in order
// of their start, form one unbroken run that covers q. (For an inverted q, which
// selects no key, etcd's answer depends on the shape of its tree; this one answers as
// if the tree visited every overlapping permission.)
func contains(perms []interval, q interval) bool {
	var minBegin, maxEnd []byte
	found := false
	for _, t := range perms {
		if !q.overlaps(t) {
			continue
		}
		if !found {
			minBegin, maxEnd, found = t.begin, t.end, true
			continue
		}
		if compare(maxEnd, t.begin) < 0 {
			return false
		}
		if compare(t.end, maxEnd) > 0 {
			maxEnd = t.end
		}
	}
	return found && compare(maxEnd, q.end) >= 0 && compare(minBegin, q.begin) <= 0
}

// intersects is etcd's IntervalTree.Intersects: some permission overlaps q.
func intersects(perms []interval, q interval) bool {
	for _, t := range perms {
		if q.overlaps(t) {
			return true
		}
	}
	return false
}

// sortIntervals orders permissions by their start, as the interval tree visits them.
func sortIntervals(ivls []interval) {
	slices.SortStableFunc(ivls, func(a, b interval) int { return compare(a.begin, b.begin) })
}

// New builds the store for checks from an auth state.
func New(st *replicav1.AuthState) *Store {
	s := &Store{
		Revision: st.GetRevision(),
		Enabled:  st.GetEnabled(),
		users:    make(map[string]*user, len(st.GetUsers())),
	}
	if k := st.GetPublicKey(); len(k) == ed25519.PublicKeySize {
		s.PublicKey = ed25519.PublicKey(k)
	} else if seed := st.GetSigningSeed(); len(seed) == ed25519.SeedSize {
		s.PublicKey = ed25519.NewKeyFromSeed(seed).Public().(ed25519.PublicKey)
	}
	roles := make(map[string]*authpb.Role, len(st.GetRoles()))
	for _, r := range st.GetRoles() {
		roles[string(r.GetName())] = r
	}
	for _, u := range st.GetUsers() {
		x := &user{
			name:       string(u.GetName()),
			roles:      u.GetRoles(),
			noPassword: u.GetOptions().GetNoPassword(),
			root:       slices.Contains(u.GetRoles(), RootRole),
		}
		for _, rn := range u.GetRoles() {
			r := roles[rn]
			if r == nil {
				continue
			}
			for _, p := range r.GetKeyPermission() {
				ivl := permInterval(p.GetKey(), p.GetRangeEnd())
				switch p.GetPermType() {
				case authpb.Permission_READ:
					x.read = append(x.read, ivl)
				case authpb.Permission_WRITE:
					x.write = append(x.write, ivl)
				case authpb.Permission_READWRITE:
					x.read = append(x.read, ivl)
					x.write = append(x.write, ivl)
				}
			}
		}
		sortIntervals(x.read)
		sortIntervals(x.write)
		s.users[x.name] = x
	}
	for _, n := range st.GetNamespaces() {
		if s.namespaces == nil {
			s.namespaces = make(map[string][]byte, len(st.GetNamespaces()))
		}
		s.namespaces[n.GetUser()] = n.GetPrefix()
	}
	return s
}

// Stamp names this state (see replicav1.AuthStamp).
func (s *Store) Stamp() *replicav1.AuthStamp {
	return &replicav1.AuthStamp{Revision: s.Revision, Enabled: s.Enabled}
}

// Decision is a gateway's decision to run a request as user ("" for none) under this
// state, encoded once; the one without a user (every request while auth is disabled)
// is made once per state.
func (s *Store) Decision(user string) Decision {
	if user == "" {
		if d := s.anonymous.Load(); d != nil {
			return *d
		}
	}
	d := Decision{Stamp: s.Stamp(), User: user}
	d.encoded = d.Encode()
	if user == "" {
		s.anonymous.Store(&d)
	}
	return d
}

// Matches tells whether a stamp names this state.
func (s *Store) Matches(st *replicav1.AuthStamp) bool {
	return st.GetRevision() == s.Revision && st.GetEnabled() == s.Enabled
}

// HasRole tells whether the user has the role (etcd's HasRole).
func (s *Store) HasRole(name, role string) bool {
	u := s.users[name]
	return u != nil && slices.Contains(u.roles, role)
}

// Perm is the kind of access a check asks for.
type Perm int

const (
	Read Perm = iota
	Write
)

// opPermitted is etcd's isOpPermitted.
func (s *Store) opPermitted(ai *Info, key, rangeEnd []byte, p Perm) error {
	if !s.Enabled {
		return nil
	}
	if ai == nil || ai.Revision == 0 {
		return etcderr.ErrUserEmpty
	}
	if ai.Revision < s.Revision {
		return etcderr.ErrAuthOldRevision
	}
	u := s.users[ai.User]
	if u == nil {
		return etcderr.ErrPermissionDenied
	}
	if u.root {
		return nil
	}
	perms := u.read
	if p == Write {
		perms = u.write
	}
	if len(rangeEnd) == 0 {
		if intersects(perms, point(key)) {
			return nil
		}
		return etcderr.ErrPermissionDenied
	}
	q := interval{begin: key, end: rangeEnd}
	if isOpenEnded(rangeEnd) {
		q.end = nil
	}
	if contains(perms, q) {
		return nil
	}
	return etcderr.ErrPermissionDenied
}

// IsRangePermitted is etcd's check for reading [key, rangeEnd).
func (s *Store) IsRangePermitted(ai *Info, key, rangeEnd []byte) error {
	return s.opPermitted(ai, key, rangeEnd, Read)
}

// IsPutPermitted is etcd's check for writing key.
func (s *Store) IsPutPermitted(ai *Info, key []byte) error {
	return s.opPermitted(ai, key, nil, Write)
}

// IsDeleteRangePermitted is etcd's check for deleting [key, rangeEnd).
func (s *Store) IsDeleteRangePermitted(ai *Info, key, rangeEnd []byte) error {
	return s.opPermitted(ai, key, rangeEnd, Write)
}

// IsAdminPermitted is etcd's check for root-only operations. Unlike the key checks it
// does not look at the token's revision.
func (s *Store) IsAdminPermitted(ai *Info) error {
	if !s.Enabled {
		return nil
	}
	if ai == nil || ai.User == "" {
		return etcderr.ErrUserEmpty
	}
	u := s.users[ai.User]
	if u == nil {
		return etcderr.ErrUserNotFound
	}
	if !u.root {
		return etcderr.ErrPermissionDenied
	}
	return nil
}

// RequireInfo is etcd's requireAuthInfo: with auth enabled, some user must be given.
func (s *Store) RequireInfo(ai *Info) error {
	if s.Enabled && ai == nil {
		return etcderr.ErrUserEmpty
	}
	return nil
}

// CheckPut is etcd's checkPutAuth without the lease part (which needs the lease's
// keys, known only to replicas: see CheckLeaseKeys).
func (s *Store) CheckPut(ai *Info, key []byte, prevKV bool) error {
	if err := s.IsPutPermitted(ai, key); err != nil {
		return err
	}
	if prevKV {
		return s.IsRangePermitted(ai, key, nil)
	}
	return nil
}

// CheckDeleteRange is etcd's check of a delete.
func (s *Store) CheckDeleteRange(ai *Info, key, rangeEnd []byte, prevKV bool) error {
	if err := s.IsDeleteRangePermitted(ai, key, rangeEnd); err != nil {
		return err
	}
	if prevKV {
		return s.IsRangePermitted(ai, key, rangeEnd)
	}
	return nil
}

// CheckLeaseKeys is etcd's checkLeasePutsKeys: an admin may do anything with a lease;
// anyone else must be allowed to write (write) or read (!write) every key attached.
func (s *Store) CheckLeaseKeys(ai *Info, keys [][]byte, write bool) error {
	if s.IsAdminPermitted(ai) == nil {
		return nil
	}
	for _, k := range keys {
		var err error
		if write {
			err = s.IsPutPermitted(ai, k)
		} else {
			err = s.IsRangePermitted(ai, k, nil)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
