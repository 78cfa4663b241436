package replica

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cockroachdb/pebble/v2"

	"github.com/kvmesh/kvmesh/services/replica/mvcc"
)

// The data directory holds the Raft log and two Pebble databases:
//
//	wal/           the Raft log, HardState and truncation point (package raftlog)
//	raft/          the member's identity (and, before the log had its own files,
//	               the log: raftlog.ImportPebble moves it into wal/ at start)
//	state-…/       the state machine: MVCC keys, members, applied index
//	STATE          names the state directory in use
//
// Keeping the state machine in its own database lets a snapshot replace it whole: the
// snapshot is written into a new directory, and installing it is one atomic rename of
// the STATE file. A crash at any point leaves STATE naming a complete database; any
// other state directory is a leftover and removed at start.
const (
	raftDirName   = "raft"
	walDirName    = "wal"
	stateFileName = "STATE"
	stateDirInit  = "state-0"
)

// state is the replicated state machine as of one database. Readers hold a reference
// (acquire/release) while they use it, so a snapshot install can swap in a new one and
// close the old once they are done.
type state struct {
	dir  string
	db   *pebble.DB
	kv   *mvcc.Store
	refs sync.WaitGroup
}

func (s *state) release() { s.refs.Done() }

// close waits for the readers still using s, then closes it.
func (s *state) close() error {
	s.refs.Wait()
	s.kv.Close()
	return s.db.Close()
}

// acquire returns the current state with a reference that the caller releases.
func (r *Replica) acquire() *state {
	r.stateMu.RLock()
	st := r.st
	st.refs.Add(1)
	r.stateMu.RUnlock()
	return st
}

// rev is the state machine's current revision.
func (r *Replica) rev() int64 {
	st := r.acquire()
	defer st.release()
	return st.kv.Rev()
}

// dbSize is the state machine database's size on disk.
func (r *Replica) dbSize() int64 {
	size, _ := r.dbSizes()
	return size
}

// dbSizes is the state machine database's size on disk and the part of it that holds
// data: what compacting away deleted and superseded versions (Defragment) would not
// give back, by Pebble's estimate. Like etcd's dbSizeInUse, it drops when a compaction
// deletes history, and the size follows after a defragmentation.
func (r *Replica) dbSizes() (size, inUse int64) {
	st := r.acquire()
	defer st.release()
	m := st.db.Metrics()
	total := m.DiskSpaceUsage()
	garbage := m.Table.Garbage.PointDeletionsBytesEstimate + m.Table.Garbage.RangeDeletionsBytesEstimate +
		m.Table.Local.ObsoleteSize + m.Table.Local.ZombieSize + m.WAL.ObsoletePhysicalSize
	used := total
	if garbage < total {
		used = total - garbage
	}
	return int64(total), int64(used)
}

// currentStateDir reads STATE (creating it for a new member) and removes state
// directories it does not name: snapshots that were received but never installed, or
// replaced states whose removal a crash interrupted.
func currentStateDir(dataDir string) (string, error) {
	name := stateDirInit
	b, err := os.ReadFile(filepath.Join(dataDir, stateFileName))
	switch {
	case err == nil:
		name = strings.TrimSpace(string(b))
		if name == "" || strings.ContainsAny(name, `/\`) {
			return "", fmt.Errorf("%s: corrupt %s file (%q)", dataDir, stateFileName, b)
		}
	case errors.Is(err, os.ErrNotExist):
		if err := writeStateFile(dataDir, name); err != nil {
			return "", err
		}
	default:
		return "", err
	}
	ents, err := os.ReadDir(dataDir)
	if err != nil {
		return "", err
	}
	for _, e := range ents {
		n := e.Name()
		if n != name && (strings.HasPrefix(n, "state-") || strings.HasPrefix(n, "snap-")) {
			if err := os.RemoveAll(filepath.Join(dataDir, n)); err != nil {
				return "", err
			}
		}
	}
	return filepath.Join(dataDir, name), nil
}

// writeStateFile atomically points STATE at the directory name: write a temporary
// file, sync it, rename it over STATE, sync the directory.
func writeStateFile(dataDir, name string) error {
	tmp := filepath.Join(dataDir, stateFileName+".tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(name + "\n"); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dataDir, stateFileName)); err != nil {
		return err
	}
	return syncDir(dataDir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
