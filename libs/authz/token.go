package authz

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"time"
)

// Tokens are JSON Web Tokens signed with Ed25519 ("EdDSA"), with etcd's JWT claims:
// username, revision (the auth revision when it was issued) and exp. Replicas sign
// them with the key in the replicated auth state; gateways verify them with the
// public key alone, without asking a replica.

var jwtHeader = base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"EdDSA","typ":"JWT"}`))

type claims struct {
	Exp      int64  `json:"exp"`
	Revision uint64 `json:"revision"`
	Username string `json:"username"`
}

// Sign issues a token for user at auth revision rev, valid until exp.
func Sign(key ed25519.PrivateKey, user string, rev uint64, exp time.Time) (string, error) {
	body, err := json.Marshal(claims{Exp: exp.Unix(), Revision: rev, Username: user})
	if err != nil {
		return "", err
	}
	signed := jwtHeader + "." + base64.RawURLEncoding.EncodeToString(body)
	sig := ed25519.Sign(key, []byte(signed))
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}

var errBadToken = errors.New("malformed or unverifiable token")

// Verify checks a token's signature and expiry and answers who it names.
func Verify(pub ed25519.PublicKey, token string, now time.Time) (Info, time.Time, error) {
	if len(pub) != ed25519.PublicKeySize {
		return Info{}, time.Time{}, errBadToken
	}
	i := strings.IndexByte(token, '.')
	j := strings.LastIndexByte(token, '.')
	if i <= 0 || j <= i {
		return Info{}, time.Time{}, errBadToken
	}
	hdr, err := base64.RawURLEncoding.DecodeString(token[:i])
	if err != nil {
		return Info{}, time.Time{}, errBadToken
	}
	var h struct {
		Alg string `json:"alg"`
	}
	if json.Unmarshal(hdr, &h) != nil || h.Alg != "EdDSA" {
		return Info{}, time.Time{}, errBadToken
	}
	sig, err := base64.RawURLEncoding.DecodeString(token[j+1:])
	if err != nil || !ed25519.Verify(pub, []byte(token[:j]), sig) {
		return Info{}, time.Time{}, errBadToken
	}
	body, err := base64.RawURLEncoding.DecodeString(token[i+1 : j])
	if err != nil {
		return Info{}, time.Time{}, errBadToken
	}
	var c claims
	dec := json.NewDecoder(bytes.NewReader(body))
	if dec.Decode(&c) != nil || c.Username == "" || c.Revision == 0 || c.Exp == 0 {
		return Info{}, time.Time{}, errBadToken
	}
	exp := time.Unix(c.Exp, 0)
	if !now.Before(exp) {
		return Info{}, time.Time{}, errBadToken
	}
	return Info{User: c.Username, Revision: c.Revision}, exp, nil
}

// ClaimedRevision is the auth revision a token says it was issued at, unverified (0
// when it says none): enough to tell that a copy of the auth state is behind the one
// that issued it, never to trust the token.
func ClaimedRevision(token string) uint64 {
	i := strings.IndexByte(token, '.')
	j := strings.LastIndexByte(token, '.')
	if i <= 0 || j <= i {
		return 0
	}
	body, err := base64.RawURLEncoding.DecodeString(token[i+1 : j])
	if err != nil {
		return 0
	}
	var c claims
	if json.Unmarshal(body, &c) != nil {
		return 0
	}
	return c.Revision
}

// Verifier verifies tokens and remembers the ones it verified until they expire, so a
// client that sends the same token with every request costs one signature check.
type Verifier struct {
	mu    sync.RWMutex
	key   string // the public key the cache was filled with
	cache map[string]cached
}

type cached struct {
	info Info
	exp  time.Time
}

// verifierCacheSize bounds the cache; when full it starts over.
const verifierCacheSize = 1 << 16

// Verify is Verify with the cache.
func (v *Verifier) Verify(pub ed25519.PublicKey, token string, now time.Time) (Info, error) {
	v.mu.RLock()
	c, ok := v.cache[token]
	same := v.key == string(pub)
	v.mu.RUnlock()
	if ok && same && now.Before(c.exp) {
		return c.info, nil
	}
	info, exp, err := Verify(pub, token, now)
	if err != nil {
		return Info{}, err
	}
	v.mu.Lock()
	if v.key != string(pub) || len(v.cache) >= verifierCacheSize {
		v.cache, v.key = nil, string(pub)
	}
	if v.cache == nil {
		v.cache = make(map[string]cached)
	}
	v.cache[token] = cached{info: info, exp: exp}
	v.mu.Unlock()
	return info, nil
}
