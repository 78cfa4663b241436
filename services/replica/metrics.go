package replica

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the replica's Prometheus metrics, under etcd's names where the meaning
// is the same so that etcd dashboards and alerts work.
type metrics struct {
	hasLeader     prometheus.Gauge
	leaderChanges prometheus.Counter
	applied       prometheus.Counter
	pending       prometheus.Gauge
	failed        prometheus.Counter
	walFsync      prometheus.Histogram
	backendCommit prometheus.Histogram

	snapshotsSent      prometheus.Counter
	snapshotsInstalled prometheus.Counter
	feedRevisions      prometheus.Counter

	leasesGranted prometheus.Counter
	leasesRevoked prometheus.Counter
	leasesExpired prometheus.Counter
	leasesRenewed prometheus.Counter

	batchCalls prometheus.Counter

	defrags        prometheus.Counter
	snapshotsSaved prometheus.Counter
	// backupLast and backupBytes are the time and size of the last scheduled backup.
	backupLast  prometheus.Gauge
	backupBytes prometheus.Gauge
	backupFails prometheus.Counter

	corruptChecks prometheus.Counter
}

func newMetrics(r *Replica) *metrics {
	m := &metrics{
		hasLeader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "etcd_server_has_leader", Help: "Whether or not a leader exists. 1 is existence, 0 is not.",
		}),
		leaderChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "etcd_server_leader_changes_seen_total", Help: "The number of leader changes seen.",
		}),
		applied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "etcd_server_proposals_applied_total", Help: "The total number of consensus proposals applied.",
		}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "etcd_server_proposals_pending", Help: "The current number of pending proposals to commit.",
		}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "etcd_server_proposals_failed_total", Help: "The total number of failed proposals seen.",
		}),
		walFsync: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "etcd_disk_wal_fsync_duration_seconds", Help: "The latency distributions of the synced Raft log write of each Ready.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		backendCommit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "etcd_disk_backend_commit_duration_seconds", Help: "The latency distributions of commits of applied batches.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		snapshotsSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmesh_replica_snapshots_sent_total", Help: "Snapshots of the state machine streamed to members behind the log.",
		}),
		snapshotsInstalled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmesh_replica_snapshots_installed_total", Help: "Snapshots of the state machine received and installed.",
		}),
		feedRevisions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmesh_replica_feed_revisions_sent_total", Help: "Revisions sent to history readers (the fanout and catching-up gateways) over Feed.",
		}),
		leasesGranted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "etcd_debugging_server_lease_granted_total", Help: "The total number of granted leases.",
		}),
		leasesRevoked: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "etcd_debugging_server_lease_revoked_total", Help: "The total number of revoked leases.",
		}),
		leasesExpired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "etcd_debugging_server_lease_expired_total", Help: "The total number of expired leases.",
		}),
		leasesRenewed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "etcd_debugging_server_lease_renewed_total", Help: "The number of renewed leases seen by the leader.",
		}),
		batchCalls: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmesh_replica_batch_calls_total", Help: "KV calls received on gateways' Batch streams.",
		}),
		defrags: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmesh_replica_defragmentations_total", Help: "Defragmentations (Maintenance.Defragment) of this replica's databases.",
		}),
		snapshotsSaved: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmesh_replica_snapshots_saved_total", Help: "Snapshots of the state streamed to clients (Maintenance.Snapshot).",
		}),
		backupLast: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kvmesh_replica_backup_last_success_timestamp_seconds", Help: "When the last scheduled backup (KVMESH_REPLICA_BACKUP_DIR) was written, as a Unix time.",
		}),
		backupBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kvmesh_replica_backup_last_size_bytes", Help: "The size of the last scheduled backup.",
		}),
		backupFails: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmesh_replica_backup_failures_total", Help: "Scheduled backups that failed.",
		}),
		corruptChecks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmesh_replica_corruption_checks_total", Help: "Completed comparisons of this member's key history hash with the other members'.",
		}),
	}
	reg := r.tel.Registry
	reg.MustRegister(m.defrags, m.snapshotsSaved, m.backupLast, m.backupBytes, m.backupFails, m.corruptChecks,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "etcd_mvcc_db_total_size_in_use_in_bytes", Help: "Total size of the underlying database logically in use in bytes.",
		}, func() float64 { _, inUse := r.dbSizes(); return float64(inUse) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "etcd_server_quota_backend_bytes", Help: "Current backend storage quota size in bytes.",
		}, func() float64 { return float64(r.quotaBytes()) }),
	)
	reg.MustRegister(m.hasLeader, m.leaderChanges, m.applied, m.pending, m.failed, m.walFsync, m.backendCommit,
		m.snapshotsSent, m.snapshotsInstalled, m.feedRevisions, m.leasesGranted, m.leasesRevoked, m.leasesExpired, m.leasesRenewed, m.batchCalls,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "etcd_mvcc_db_total_size_in_bytes", Help: "Total size of the underlying database physically allocated in bytes.",
		}, func() float64 { return float64(r.dbSize()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "etcd_debugging_mvcc_current_revision", Help: "The current revision of store.",
		}, func() float64 { return float64(r.rev()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "etcd_server_is_leader", Help: "Whether or not this member is a leader. 1 if is, 0 otherwise.",
		}, func() float64 {
			if r.leader.Load() == r.id {
				return 1
			}
			return 0
		}),
	)
	return m
}
