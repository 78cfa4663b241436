// Package health serves the health endpoints every kvmesh service has, answering them
// as etcd 3.6+ does:
//
//   - /health: JSON {"health":"true","reason":""}, or 503 with the reason. With
//     ?serializable=true the leader is not required.
//   - /livez and /readyz: named checks, "ok\n" when all pass (with ?verbose, one
//     "[+]name ok" line per check first), 503 with a "[-]name failed: error" line per
//     failed check otherwise. ?exclude=name skips a check (an unknown name is ignored,
//     as etcd ignores it), and /livez/name or /readyz/name runs just one.
//
// Only GET is allowed, as in etcd. The results are counted under etcd's metric names.
package health

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// Check is one named check: nil when it passes.
type Check func(ctx context.Context) error

// Verdict is the answer of /health: ok, or the reason it is not (etcd's words, such
// as "RAFT NO LEADER").
type Verdict func(ctx context.Context, serializable bool) (reason string, ok bool)

type named struct {
	name  string
	check Check
}

// Endpoints is one service's set of health endpoints.
type Endpoints struct {
	log     *slog.Logger
	health  Verdict
	livez   []named
	readyz  []named
	success prometheus.Counter
	failed  prometheus.Counter
	gauge   *prometheus.GaugeVec
	counter *prometheus.CounterVec
}

// New returns endpoints whose results are counted in reg (which may be nil).
func New(log *slog.Logger, reg prometheus.Registerer) *Endpoints {
	e := &Endpoints{
		log:     log,
		success: prometheus.NewCounter(prometheus.CounterOpts{Name: "etcd_server_health_success", Help: "The total number of successful health checks"}),
		failed:  prometheus.NewCounter(prometheus.CounterOpts{Name: "etcd_server_health_failures", Help: "The total number of failed health checks"}),
		gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "etcd_server_healthcheck", Help: "The result of each kind of healthcheck."},
			[]string{"type", "name"}),
		counter: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "etcd_server_healthchecks_total", Help: "The total number of each kind of healthcheck."},
			[]string{"type", "name", "status"}),
	}
	if reg != nil {
		// In the all-in-one several services share one registry: they share the
		// counters too.
		e.success = register(reg, e.success)
		e.failed = register(reg, e.failed)
		e.gauge = register(reg, e.gauge)
		e.counter = register(reg, e.counter)
	}
	return e
}

func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var already prometheus.AlreadyRegisteredError
		if errors.As(err, &already) {
			if existing, ok := already.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic(err)
	}
	return c
}

// Health sets the verdict of /health.
func (e *Endpoints) Health(v Verdict) { e.health = v }

// Live adds a /livez check. Checks run in the order they were added.
func (e *Endpoints) Live(name string, c Check) { e.livez = append(e.livez, named{name, c}) }

// Ready adds a /readyz check.
func (e *Endpoints) Ready(name string, c Check) { e.readyz = append(e.readyz, named{name, c}) }

// Mux is where the endpoints are installed (an *http.ServeMux or an rpcmux.Mux).
type Mux interface {
	HandleFunc(pattern string, f func(http.ResponseWriter, *http.Request))
}

// Install registers /health, /livez, /readyz and one path per check.
func (e *Endpoints) Install(mux Mux) {
	if e.health != nil {
		mux.HandleFunc("/health", e.serveHealth)
	}
	for _, set := range []struct {
		kind   string
		checks []named
	}{{"livez", e.livez}, {"readyz", e.readyz}} {
		kind, checks := set.kind, set.checks
		mux.HandleFunc("/"+kind, func(w http.ResponseWriter, r *http.Request) {
			excluded := map[string]bool{}
			for _, v := range r.URL.Query()["exclude"] {
				for _, name := range strings.Split(v, ",") {
					excluded[strings.TrimSpace(name)] = true
				}
			}
			var run []named
			for _, c := range checks {
				if !excluded[c.name] {
					run = append(run, c)
				}
			}
			e.serveChecks(w, r, kind, run)
		})
		for _, c := range checks {
			one := []named{c}
			mux.HandleFunc("/"+kind+"/"+c.name, func(w http.ResponseWriter, r *http.Request) {
				e.serveChecks(w, r, kind, one)
			})
		}
	}
}

func getOnly(w http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodGet {
		return true
	}
	w.Header().Set("Allow", http.MethodGet)
	http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
	return false
}

func (e *Endpoints) serveHealth(w http.ResponseWriter, r *http.Request) {
	if !getOnly(w, r) {
		return
	}
	reason, ok := e.health(r.Context(), r.URL.Query().Get("serializable") == "true")
	body, _ := json.Marshal(struct {
		Health string `json:"health"`
		Reason string `json:"reason"`
	}{fmt.Sprint(ok), reason})
	if !ok {
		e.failed.Inc()
		e.log.Warn("/health error", "output", string(body), "status-code", http.StatusServiceUnavailable)
		http.Error(w, string(body), http.StatusServiceUnavailable)
		return
	}
	e.success.Inc()
	w.Header().Set("Content-Type", "application/json")
	w.Write(body)
}

func (e *Endpoints) serveChecks(w http.ResponseWriter, r *http.Request, kind string, checks []named) {
	if !getOnly(w, r) {
		return
	}
	var out bytes.Buffer
	failed := false
	for _, c := range checks {
		status := "success"
		if err := c.check(r.Context()); err != nil {
			fmt.Fprintf(&out, "[-]%s failed: %v\n", c.name, err)
			failed, status = true, "error"
			e.gauge.WithLabelValues(kind, c.name).Set(0)
		} else {
			fmt.Fprintf(&out, "[+]%s ok\n", c.name)
			e.gauge.WithLabelValues(kind, c.name).Set(1)
		}
		e.counter.WithLabelValues(kind, c.name, status).Inc()
	}
	if failed {
		e.log.Warn("health check error", "path", r.URL.Path, "reason", out.String(), "status-code", http.StatusServiceUnavailable)
		http.Error(w, out.String(), http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if _, verbose := r.URL.Query()["verbose"]; verbose {
		w.Write(out.Bytes())
	}
	fmt.Fprint(w, "ok\n")
}

// RequestTimeout bounds a health check's read: etcd's request timeout with its default
// election timeout (5 s + 2 × 1 s).
const RequestTimeout = 7 * time.Second

// Read runs read (the one-key range etcd's checks make) within RequestTimeout and
// reports its failure in etcd's words: "etcdserver: request timed out" when the time
// ran out, else the error's message.
func Read(ctx context.Context, read func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, RequestTimeout)
	defer cancel()
	err := read(ctx)
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return etcderr.ErrTimeout
	default:
		_, msg := etcderr.CodeMessage(err)
		return errors.New(msg)
	}
}
