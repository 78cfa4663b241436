// Package rpcmux routes HTTP requests to Connect services by their path prefix
// ("/package.Service/"), with one map lookup. net/http's ServeMux parses and unescapes
// every path against its patterns, which costs more per call than a small RPC's whole
// protocol handling; RPC paths need none of that.
package rpcmux

import (
	"net/http"
	"strings"
)

// Mux is an http.Handler over Connect service handlers and plain HTTP endpoints.
type Mux struct {
	services map[string]http.Handler // "/package.Service/" → handler
	exact    map[string]http.Handler // "/metrics" → handler
	prefixes []prefixRoute           // "/debug/pprof/" → handler
}

type prefixRoute struct {
	prefix string
	h      http.Handler
}

// New returns an empty Mux.
func New() *Mux {
	return &Mux{services: make(map[string]http.Handler), exact: make(map[string]http.Handler)}
}

// Handle registers h for pattern: an exact path (a procedure, "/pkg.Service/Method",
// or an endpoint), a service prefix ("/pkg.Service/", as returned by the generated
// New…Handler functions: the service's procedures not registered exactly), or a prefix
// ending in "/". An exact path wins over a prefix.
func (m *Mux) Handle(pattern string, h http.Handler) {
	switch {
	case strings.HasSuffix(pattern, "/") && strings.Count(pattern, "/") == 2 && strings.Contains(pattern, "."):
		m.services[pattern] = h
	case strings.HasSuffix(pattern, "/"):
		m.prefixes = append(m.prefixes, prefixRoute{pattern, h})
	default:
		m.exact[pattern] = h
	}
}

// HandleFunc registers f for pattern, as Handle.
func (m *Mux) HandleFunc(pattern string, f func(http.ResponseWriter, *http.Request)) {
	m.Handle(pattern, http.HandlerFunc(f))
}

// ServeHTTP implements http.Handler.
func (m *Mux) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	if h, ok := m.exact[p]; ok {
		h.ServeHTTP(w, r)
		return
	}
	if i := strings.LastIndexByte(p, '/'); i > 0 {
		if h, ok := m.services[p[:i+1]]; ok {
			h.ServeHTTP(w, r)
			return
		}
	}
	for _, pr := range m.prefixes {
		if strings.HasPrefix(p, pr.prefix) {
			pr.h.ServeHTTP(w, r)
			return
		}
	}
	http.NotFound(w, r)
}
