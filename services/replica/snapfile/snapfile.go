// Package snapfile is the kvmesh snapshot file: a replica's state machine (every pair of
// its state database: keys with their whole history, leases, auth, members, alarms) at
// one moment, as `etcdctl snapshot save` writes it and `kvmesh-replica snapshot
// restore` reads it.
//
// Layout:
//
//	"kvmesh snapshot 1\n"
//	pairs:    uvarint len(key) > 0, key, uvarint len(value), value   (repeated)
//	end:      uvarint 0
//	meta:     uvarint len(json), json Meta
//	padding:  zero bytes up to a multiple of 512
//	trailer:  SHA-256 of everything before it (32 bytes)
//
// The trailer is etcd's: etcd streams its database and then the SHA-256 of it, and
// etcdctl accepts a snapshot only when its size is 32 more than a multiple of 512 (it
// checks nothing else), hence the padding. A reader verifies the trailer before it
// trusts a byte of the content (Verify), so a truncated or damaged file is refused
// whole.
package snapfile

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
)

const magic = "kvmesh snapshot 1\n"

// blockSize is what the content (before the trailer) is padded to.
const blockSize = 512

// maxMetaBytes bounds the meta record a reader accepts.
const maxMetaBytes = 1 << 20

// Meta describes a snapshot.
type Meta struct {
	// Version is the etcd API version of the replica that wrote it.
	Version string `json:"version"`
	// Revision is the store's revision; CompactRevision its last compaction (-1: none).
	Revision        int64 `json:"revision"`
	CompactRevision int64 `json:"compactRevision"`
	// TotalKey is the number of live keys.
	TotalKey int64 `json:"totalKey"`
	// Pairs is the number of database pairs; Hash is their CRC-32C (Castagnoli), as
	// etcdutl hashes a snapshot's buckets.
	Pairs uint64 `json:"pairs"`
	Hash  uint32 `json:"hash"`
	// RaftIndex and RaftTerm are the last Raft entry applied to the state.
	RaftIndex uint64 `json:"raftIndex"`
	RaftTerm  uint64 `json:"raftTerm"`
	// MemberID and ClusterID are the member that wrote it and its cluster.
	MemberID  uint64 `json:"memberId"`
	ClusterID uint64 `json:"clusterId"`
}

// Writer writes a snapshot file.
type Writer struct {
	out   io.Writer     // the file
	w     *bufio.Writer // to the file and the SHA-256
	sha   hash.Hash
	crc   hash.Hash32
	n     int64 // bytes written before the trailer
	pairs uint64
	buf   []byte
	err   error
}

// NewWriter starts a snapshot on w.
func NewWriter(w io.Writer) *Writer {
	sw := &Writer{out: w, sha: sha256.New(), crc: crc32.New(crc32.MakeTable(crc32.Castagnoli))}
	sw.w = bufio.NewWriterSize(io.MultiWriter(w, sw.sha), 256<<10)
	sw.write([]byte(magic))
	return sw
}

func (w *Writer) write(b []byte) {
	if w.err != nil {
		return
	}
	_, w.err = w.w.Write(b)
	w.n += int64(len(b))
}

// Add appends one pair; keys are never empty.
func (w *Writer) Add(key, value []byte) error {
	if len(key) == 0 {
		return errors.New("snapfile: empty key")
	}
	w.buf = binary.AppendUvarint(w.buf[:0], uint64(len(key)))
	w.write(w.buf)
	w.write(key)
	w.buf = binary.AppendUvarint(w.buf[:0], uint64(len(value)))
	w.write(w.buf)
	w.write(value)
	w.crc.Write(key)
	w.crc.Write(value)
	w.pairs++
	return w.err
}

// Close ends the snapshot with meta (its Pairs and Hash are the writer's), the padding
// and the trailer, and returns the meta written and the file's size.
func (w *Writer) Close(meta Meta) (Meta, int64, error) {
	meta.Pairs, meta.Hash = w.pairs, w.crc.Sum32()
	mb, err := json.Marshal(meta)
	if err != nil {
		return meta, 0, err
	}
	w.write(binary.AppendUvarint(nil, 0))
	w.write(binary.AppendUvarint(nil, uint64(len(mb))))
	w.write(mb)
	if pad := w.n % blockSize; pad != 0 {
		w.write(make([]byte, blockSize-pad))
	}
	if w.err == nil {
		w.err = w.w.Flush()
	}
	if w.err != nil {
		return meta, 0, w.err
	}
	sum := w.sha.Sum(nil)
	if _, err := w.out.Write(sum); err != nil {
		return meta, 0, err
	}
	return meta, w.n + int64(len(sum)), nil
}

// ErrCorrupt is the failure of a file that is not a complete, intact snapshot.
var ErrCorrupt = errors.New("snapshot file is corrupt")

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// Verify checks path's trailer (its size and SHA-256) and returns its meta, reading
// the pairs through to check their count and CRC as well.
func Verify(path string) (Meta, error) {
	return Read(path, nil)
}

// Read verifies path's trailer, then calls fn (if not nil) with every pair in order,
// and returns the meta. The slices passed to fn are valid only during the call. fn
// sees nothing of a file whose trailer is wrong.
func Read(path string, fn func(key, value []byte) error) (Meta, error) {
	f, err := os.Open(path)
	if err != nil {
		return Meta{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Meta{}, err
	}
	size := fi.Size()
	if size < int64(len(magic))+sha256.Size || (size-sha256.Size)%blockSize != 0 {
		return Meta{}, corrupt("size %d is not a whole snapshot (truncated?)", size)
	}
	body := size - sha256.Size
	sha := sha256.New()
	if _, err := io.Copy(sha, io.NewSectionReader(f, 0, body)); err != nil {
		return Meta{}, err
	}
	want := make([]byte, sha256.Size)
	if _, err := f.ReadAt(want, body); err != nil {
		return Meta{}, err
	}
	if !bytes.Equal(sha.Sum(nil), want) {
		return Meta{}, corrupt("SHA-256 mismatch (damaged or truncated)")
	}
	return readContent(bufio.NewReaderSize(io.NewSectionReader(f, 0, body), 256<<10), fn)
}

func readContent(r *bufio.Reader, fn func(key, value []byte) error) (Meta, error) {
	head := make([]byte, len(magic))
	if _, err := io.ReadFull(r, head); err != nil || string(head) != magic {
		return Meta{}, corrupt("not a kvmesh snapshot")
	}
	crc := crc32.New(crc32.MakeTable(crc32.Castagnoli))
	var pairs uint64
	var key, value []byte
	for {
		kl, err := binary.ReadUvarint(r)
		if err != nil {
			return Meta{}, corrupt("pair %d: %v", pairs, err)
		}
		if kl == 0 {
			break
		}
		if key, err = readN(r, kl, key); err != nil {
			return Meta{}, corrupt("pair %d key: %v", pairs, err)
		}
		vl, err := binary.ReadUvarint(r)
		if err != nil {
			return Meta{}, corrupt("pair %d: %v", pairs, err)
		}
		if value, err = readN(r, vl, value); err != nil {
			return Meta{}, corrupt("pair %d value: %v", pairs, err)
		}
		crc.Write(key)
		crc.Write(value)
		pairs++
		if fn != nil {
			if err := fn(key, value); err != nil {
				return Meta{}, err
			}
		}
	}
	ml, err := binary.ReadUvarint(r)
	if err != nil || ml > maxMetaBytes {
		return Meta{}, corrupt("meta record")
	}
	mb, err := readN(r, ml, nil)
	if err != nil {
		return Meta{}, corrupt("meta record: %v", err)
	}
	var meta Meta
	if err := json.Unmarshal(mb, &meta); err != nil {
		return Meta{}, corrupt("meta record: %v", err)
	}
	if meta.Pairs != pairs || meta.Hash != crc.Sum32() {
		return Meta{}, corrupt("%d pairs with CRC %08x, meta says %d with %08x", pairs, crc.Sum32(), meta.Pairs, meta.Hash)
	}
	return meta, nil
}

// readN reads n bytes into buf's storage, growing it; n is bounded by what is left of
// the file only, so a damaged length fails as a short read rather than a huge
// allocation beyond the file.
func readN(r *bufio.Reader, n uint64, buf []byte) ([]byte, error) {
	if n > 1<<32 {
		return nil, fmt.Errorf("length %d", n)
	}
	if uint64(cap(buf)) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	_, err := io.ReadFull(r, buf)
	return buf, err
}
