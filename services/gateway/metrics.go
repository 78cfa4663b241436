package gateway

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// gatewayMetrics are the gateway's own metrics, beside the public API's (under etcd's
// gRPC names, see libs/telemetry) and the watch hub's.
type gatewayMetrics struct {
	leaderChanges prometheus.Counter
	unreachable   prometheus.Counter   // a request sent to the next replica: the first could not be reached
	readRetries   prometheus.Counter   // a read sent to the next replica: the first could not serve it
	authFailures  prometheus.Counter   // Authenticate answered "authentication failed"
	authThrottled prometheus.Counter   // Authenticate refused after too many failures
	authStale     prometheus.Counter   // requests decided again: the auth state changed under them
	recipeWaiters *prometheus.GaugeVec // Lock, Campaign and Observe calls waiting on a watch, by RPC
}

func (g *Gateway) registerMetrics() {
	failovers := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kvmesh_gateway_upstream_failovers_total",
		Help: "Requests the gateway sent on to another replica, by reason: unreachable (the request never arrived) or read_retried (the replica could not serve a read).",
	}, []string{"reason"})
	g.m.unreachable = failovers.WithLabelValues("unreachable")
	g.m.readRetries = failovers.WithLabelValues("read_retried")
	g.m.leaderChanges = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "kvmesh_gateway_leader_changes_seen_total",
		Help: "Leader changes the gateway's view of the cluster followed.",
	})
	g.m.authFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "kvmesh_gateway_auth_failures_total",
		Help: "Authenticate requests that failed for a wrong user name or password.",
	})
	g.m.authThrottled = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "kvmesh_gateway_auth_throttled_total",
		Help: "Authenticate requests refused because the user or the client address failed too often.",
	})
	g.m.authStale = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "kvmesh_gateway_auth_redecided_total",
		Help: "Requests decided again because the auth state changed between the gateway's decision and the replica.",
	})
	g.m.recipeWaiters = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kvmesh_gateway_recipe_waiters",
		Help: "Lock, Campaign and Observe calls waiting for keys to change, by RPC.",
	}, []string{"rpc"})
	g.tel.Registry.MustRegister(failovers, g.m.leaderChanges, g.m.authFailures, g.m.authThrottled, g.m.authStale, g.m.recipeWaiters,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "kvmesh_gateway_replicas_reachable",
			Help: "Voting replicas the gateway can reach now.",
		}, func() float64 { return float64(g.view.reachable(time.Now())) }))
	// etcd's own gauge, for the tools that watch it on the client port. A replica in the
	// same process (the all-in-one) has registered it already, with the same meaning.
	err := g.tel.Registry.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "etcd_server_has_leader",
		Help: "Whether or not a leader exists. 1 is existence, 0 is not.",
	}, func() float64 {
		if g.view.leaderID() != 0 {
			return 1
		}
		return 0
	}))
	var already prometheus.AlreadyRegisteredError
	if err != nil && !errors.As(err, &already) {
		panic(err)
	}
}
