package health

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The answers below are etcd 3.7's, seen with curl against a member of a 3-member
// cluster whose two peers had been killed (so its linearizable read timed out).
func TestAnswersAsEtcd(t *testing.T) {
	leader := false
	linearizable := errors.New("etcdserver: request timed out")
	reg := prometheus.NewRegistry()
	e := New(slog.New(slog.NewTextHandler(io.Discard, nil)), reg)
	e.Health(func(_ context.Context, serializable bool) (string, bool) {
		if !serializable && !leader {
			return "RAFT NO LEADER", false
		}
		return "", true
	})
	e.Live("serializable_read", func(context.Context) error { return nil })
	e.Ready("serializable_read", func(context.Context) error { return nil })
	e.Ready("linearizable_read", func(context.Context) error { return linearizable })
	mux := http.NewServeMux()
	e.Install(mux)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	get := func(method, path string) (int, string) {
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, c := range []struct {
		path string
		code int
		body string
	}{
		{"/health", 503, `{"health":"false","reason":"RAFT NO LEADER"}` + "\n"},
		{"/health?serializable=true", 200, `{"health":"true","reason":""}`},
		{"/livez", 200, "ok\n"},
		{"/livez?verbose", 200, "[+]serializable_read ok\nok\n"},
		{"/livez/serializable_read", 200, "ok\n"},
		{"/readyz", 503, "[+]serializable_read ok\n[-]linearizable_read failed: etcdserver: request timed out\n\n"},
		{"/readyz/linearizable_read", 503, "[-]linearizable_read failed: etcdserver: request timed out\n\n"},
		{"/readyz?exclude=linearizable_read", 200, "ok\n"},
		{"/readyz?verbose&exclude=linearizable_read,no_such_check", 200, "[+]serializable_read ok\nok\n"},
	} {
		code, body := get(http.MethodGet, c.path)
		if code != c.code || body != c.body {
			t.Errorf("GET %s: %d %q, want %d %q", c.path, code, body, c.code, c.body)
		}
	}
	leader, linearizable = true, nil
	if code, body := get(http.MethodGet, "/health"); code != 200 || body != `{"health":"true","reason":""}` {
		t.Errorf("GET /health with a leader: %d %q", code, body)
	}
	if code, body := get(http.MethodGet, "/readyz?verbose"); code != 200 || body != "[+]serializable_read ok\n[+]linearizable_read ok\nok\n" {
		t.Errorf("GET /readyz?verbose when ready: %d %q", code, body)
	}
	for _, path := range []string{"/health", "/livez", "/readyz/serializable_read"} {
		if code, body := get(http.MethodPost, path); code != http.StatusMethodNotAllowed || !strings.HasPrefix(body, "Method Not Allowed") {
			t.Errorf("POST %s: %d %q", path, code, body)
		}
	}
	if got := testutil.ToFloat64(e.failed); got != 1 {
		t.Errorf("etcd_server_health_failures = %v, want 1", got)
	}
	if got := testutil.ToFloat64(e.gauge.WithLabelValues("readyz", "linearizable_read")); got != 1 {
		t.Errorf("etcd_server_healthcheck{readyz,linearizable_read} = %v, want 1 after it passed", got)
	}
	// A second set in the same registry (the all-in-one) shares the counters.
	again := New(slog.New(slog.NewTextHandler(io.Discard, nil)), reg)
	if again.failed != e.failed {
		t.Error("a second Endpoints in one registry has its own counter")
	}
}
