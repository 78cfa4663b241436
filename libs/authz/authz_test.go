package authz

import (
	"crypto/ed25519"
	"encoding/base64"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/pkg/v3/adt"
)

// TestIntervalsAgreeWithEtcd holds contains and intersects to etcd's interval tree
// (go.etcd.io/etcd/pkg/v3/adt, which etcd's range permission cache uses) on random
// permission sets and queries over a small alphabet, so that overlaps, adjacency,
// points and open ends all come up. Inverted query ranges (key after range end, which
// select no key) are left out: etcd's answer for them depends on the shape of its
// red-black tree, that is on the order permissions were granted in.
func TestIntervalsAgreeWithEtcd(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	key := func() []byte {
		b := make([]byte, 1+rnd.IntN(2))
		for i := range b {
			b[i] = "abcd"[rnd.IntN(4)]
		}
		return b
	}
	end := func() []byte {
		switch rnd.IntN(4) {
		case 0:
			return nil // a point
		case 1:
			return []byte{0} // open
		}
		return key()
	}
	for round := range 20000 {
		tree := adt.NewIntervalTree()
		var mine []interval
		for range rnd.IntN(5) {
			k, e := key(), end()
			if !validPermissionRange(k, e) {
				continue
			}
			var ivl adt.Interval
			switch {
			case len(e) == 0:
				ivl = adt.NewBytesAffinePoint(k)
			case isOpenEnded(e):
				ivl = adt.NewBytesAffineInterval(k, nil)
			default:
				ivl = adt.NewBytesAffineInterval(k, e)
			}
			tree.Insert(ivl, struct{}{})
			mine = append(mine, permInterval(k, e))
		}
		sortIntervals(mine)
		qk, qe := key(), end()
		var want, got bool
		if len(qe) == 0 {
			want = tree.Intersects(adt.NewBytesAffinePoint(qk))
			got = intersects(mine, point(qk))
		} else {
			q := interval{begin: qk, end: qe}
			if isOpenEnded(qe) {
				q.end = nil
			}
			if compare(q.begin, q.end) >= 0 {
				continue
			}
			want = tree.Contains(adt.NewBytesAffineInterval(q.begin, q.end))
			got = contains(mine, q)
		}
		if got != want {
			t.Fatalf("round %d: perms %q, query [%q, %q): etcd %v, kvmesh %v", round, mine, qk, qe, want, got)
		}
	}
}

func TestTokens(t *testing.T) {
	seed := make([]byte, ed25519.SeedSize)
	priv := ed25519.NewKeyFromSeed(seed)
	pub := priv.Public().(ed25519.PublicKey)
	now := time.Unix(1_800_000_000, 0)
	tok, err := Sign(priv, "alice", 7, now.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	info, exp, err := Verify(pub, tok, now)
	if err != nil || info != (Info{User: "alice", Revision: 7}) || !exp.Equal(now.Add(time.Minute)) {
		t.Fatalf("verify: %+v %v %v", info, exp, err)
	}
	if _, _, err := Verify(pub, tok, now.Add(time.Minute)); err == nil {
		t.Fatal("an expired token verified")
	}
	other := ed25519.NewKeyFromSeed(append(make([]byte, ed25519.SeedSize-1), 1)).Public().(ed25519.PublicKey)
	if _, _, err := Verify(other, tok, now); err == nil {
		t.Fatal("a token verified with another key")
	}
	parts := strings.Split(tok, ".")
	forged := base64.RawURLEncoding.EncodeToString([]byte(`{"exp":1900000000,"revision":7,"username":"root"}`))
	noneAlg := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`))
	for name, bad := range map[string]string{
		"other claims, same signature": parts[0] + "." + forged + "." + parts[2],
		"alg none":                     noneAlg + "." + parts[1] + ".",
		"alg none, signature kept":     noneAlg + "." + parts[1] + "." + parts[2],
		"truncated":                    parts[0] + "." + parts[1],
		"empty":                        "",
		"garbage":                      "a.b.c",
	} {
		if _, _, err := Verify(pub, bad, now); err == nil {
			t.Errorf("%s: verified", name)
		}
	}
	var v Verifier
	for range 2 {
		if info, err := v.Verify(pub, tok, now); err != nil || info.User != "alice" {
			t.Fatalf("cached verify: %+v %v", info, err)
		}
	}
	if _, err := v.Verify(pub, tok, now.Add(2*time.Minute)); err == nil {
		t.Fatal("the cache answered for an expired token")
	}
	if _, err := v.Verify(other, tok, now); err == nil {
		t.Fatal("the cache answered for another key")
	}
}

func TestStampEncoding(t *testing.T) {
	for _, d := range []Decision{
		{Stamp: New(nil).Stamp()},
		{Stamp: (&Store{Revision: 12, Enabled: true}).Stamp(), User: "a:b c/%ü"},
	} {
		got, ok := Decode(d.Encode())
		if !ok || got.User != d.User || got.Stamp.GetRevision() != d.Stamp.GetRevision() || got.Stamp.GetEnabled() != d.Stamp.GetEnabled() {
			t.Fatalf("%+v → %q → %+v %v", d, d.Encode(), got, ok)
		}
	}
	for _, bad := range []string{"", "1", "1:2:x", "x:1:u", "1:1:%zz"} {
		if _, ok := Decode(bad); ok {
			t.Errorf("%q decoded", bad)
		}
	}
}

func TestClaimedRevisionReadsWithoutTrusting(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := Sign(priv, "alice", 42, time.Now().Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if got := ClaimedRevision(tok); got != 42 {
		t.Errorf("ClaimedRevision = %d, want 42", got)
	}
	for _, bad := range []string{"", "simple-token.7", "a.b", "x.!!!.y"} {
		if got := ClaimedRevision(bad); got != 0 {
			t.Errorf("ClaimedRevision(%q) = %d, want 0", bad, got)
		}
	}
}
