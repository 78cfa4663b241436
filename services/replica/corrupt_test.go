package replica

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// TestCorruptMemberRaisesItsOwnAlarm corrupts one member's key history offline (one
// byte of one revision's value in its state database), restarts it, and requires the
// CORRUPT alarm within one check interval, raised for that member alone; writes are
// then refused with etcd's error on every member, reads go on, and /readyz reports
// data_corruption.
func TestCorruptMemberRaisesItsOwnAlarm(t *testing.T) {
	members := startClusterWith(t, 3, func(c *Config) { c.CorruptCheckInterval = 200 * time.Millisecond })
	lead := leader(t, members)
	for i := range 20 {
		if _, err := lead.kv.Put(context.Background(), &pb.PutRequest{Key: []byte(fmt.Sprintf("k%02d", i)), Value: []byte("value")}); err != nil {
			t.Fatal(err)
		}
	}
	bad := follower(members, lead)
	requireEventually(t, func() bool { return bad.r.applied.Load() >= lead.r.applied.Load() })
	// Healthy members agree: checks complete and raise nothing.
	requireEventually(t, func() bool { return testutil.ToFloat64(bad.r.m.corruptChecks) >= 2 })
	if a := lead.r.alarms.all(); len(a) != 0 {
		t.Fatalf("alarms %v in a healthy cluster", a)
	}

	bad.stop(t)
	corruptOneRevision(t, bad.cfg.DataDir)
	bad.start(t)

	requireEventually(t, func() bool { return len(lead.r.alarms.list(pb.AlarmType_CORRUPT)) > 0 })
	for _, m := range members {
		requireEventually(t, func() bool { return len(m.r.alarms.list(pb.AlarmType_CORRUPT)) == 1 })
		al := m.r.alarms.list(pb.AlarmType_CORRUPT)
		if al[0].GetMemberID() != bad.r.ID() {
			t.Fatalf("CORRUPT raised for %x, want the corrupted member %x only", al[0].GetMemberID(), bad.r.ID())
		}
	}
	for _, m := range members {
		_, err := m.kv.Put(context.Background(), &pb.PutRequest{Key: []byte("after"), Value: []byte("v")})
		if !errors.Is(err, etcderr.ErrCorrupt) || !strings.Contains(err.Error(), "etcdserver: corrupt cluster") {
			t.Fatalf("put through %s under CORRUPT: %v, want etcd's corrupt cluster", m.cfg.Name, err)
		}
		if _, err := m.kv.Range(context.Background(), &pb.RangeRequest{Key: []byte("k00")}); err != nil {
			t.Fatalf("range through %s under CORRUPT: %v", m.cfg.Name, err)
		}
	}
	resp, err := http.Get("http://" + lead.r.Addr() + "/readyz?verbose")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	rec := string(body)
	if !strings.Contains(rec, "[-]data_corruption failed") {
		t.Fatalf("/readyz under CORRUPT:\n%s\nwant a failed data_corruption check", rec)
	}
}

// corruptOneRevision flips the last byte of the first revision record's value in the
// state database of the stopped member whose data directory is dataDir.
func corruptOneRevision(t *testing.T, dataDir string) {
	t.Helper()
	dir, err := currentStateDir(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	db, err := pebble.Open(dir, &pebble.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{'r'}, UpperBound: []byte{'s'}})
	if err != nil {
		t.Fatal(err)
	}
	if !it.Last() {
		t.Fatal("no revision records to corrupt")
	}
	k, v := append([]byte(nil), it.Key()...), append([]byte(nil), it.Value()...)
	it.Close()
	v[len(v)-1] ^= 0x01
	if err := db.Set(k, v, pebble.Sync); err != nil {
		t.Fatal(err)
	}
}
