package replica

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Scheduled backups (beyond etcd): with KVMESH_REPLICA_BACKUP_DIR set, the replica
// writes a snapshot file (the one `etcdctl snapshot save` receives) into that directory
// every KVMESH_REPLICA_BACKUP_INTERVAL and keeps the newest KVMESH_REPLICA_BACKUP_KEEP.
// Each is written atomically (saveSnapshot: a temporary file, synced, renamed, the
// directory synced), so the directory only ever holds whole snapshots, which
// `kvmesh-replica snapshot restore` takes as they are. Files are named after the
// member and the time (kvmesh-backup-<member ID>-<UTC time>.db), so members may share
// a directory; each rotates its own.

const (
	backupPrefix = "kvmesh-backup-"
	backupSuffix = ".db"
	// backupTimeFormat sorts by name in time order.
	backupTimeFormat = "20060102T150405.000Z"
)

// backupLoop writes the scheduled backups until Stop.
func (r *Replica) backupLoop() {
	defer r.loops.Done()
	t := time.NewTicker(r.cfg.BackupInterval)
	defer t.Stop()
	for {
		select {
		case <-r.quitc:
			return
		case <-t.C:
		}
		if err := r.backupOnce(time.Now()); err != nil {
			r.m.backupFails.Inc()
			r.log.Warn("scheduled backup failed", "dir", r.cfg.BackupDir, "err", err)
		}
	}
}

// backupOnce writes one backup and removes those beyond the newest BackupKeep.
func (r *Replica) backupOnce(now time.Time) error {
	if err := os.MkdirAll(r.cfg.BackupDir, 0o700); err != nil {
		return err
	}
	path := filepath.Join(r.cfg.BackupDir, r.backupPrefix()+now.UTC().Format(backupTimeFormat)+backupSuffix)
	meta, size, err := r.saveSnapshot(path)
	if err != nil {
		return err
	}
	r.m.backupLast.Set(float64(now.Unix()))
	r.m.backupBytes.Set(float64(size))
	r.log.Info("scheduled backup written", "path", path, "revision", meta.Revision, "bytes", size)
	return r.pruneBackups()
}

func (r *Replica) pruneBackups() error {
	ents, err := os.ReadDir(r.cfg.BackupDir)
	if err != nil {
		return err
	}
	var names []string
	for _, e := range ents {
		if n := e.Name(); strings.HasPrefix(n, r.backupPrefix()) && strings.HasSuffix(n, backupSuffix) {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	for len(names) > r.cfg.BackupKeep {
		if err := os.Remove(filepath.Join(r.cfg.BackupDir, names[0])); err != nil {
			return err
		}
		names = names[1:]
	}
	return nil
}

// backupPrefix starts the names of this member's backups.
func (r *Replica) backupPrefix() string { return fmt.Sprintf("%s%x-", backupPrefix, r.id) }
