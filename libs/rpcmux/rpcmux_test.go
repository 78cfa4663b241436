package rpcmux

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestRoutes(t *testing.T) {
	m := New()
	named := func(name string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, name) })
	}
	m.Handle("/etcdserverpb.KV/", named("kv"))
	m.Handle("/grpc.health.v1.Health/Check", named("health"))
	m.Handle("/metrics", named("metrics"))
	m.Handle("/debug/pprof/", named("pprof"))
	cases := map[string]string{
		"/etcdserverpb.KV/Range":       "kv",
		"/etcdserverpb.KV/Put":         "kv",
		"/grpc.health.v1.Health/Check": "health",
		"/metrics":                     "metrics",
		"/debug/pprof/heap":            "pprof",
		"/etcdserverpb.Watch/Watch":    "404",
		"/etcdserverpb.KV":             "404",
		"/":                            "404",
	}
	for path, want := range cases {
		rec := httptest.NewRecorder()
		m.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, nil))
		got := rec.Body.String()
		if rec.Code == http.StatusNotFound {
			got = "404"
		}
		if got != want {
			t.Errorf("%s routed to %q, want %q", path, got, want)
		}
	}
}
