package raftlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// The log is a directory of segment files, each named by its sequence number
// (0000000000000001.wal, …) and holding records back to back from offset 0:
//
//	crc32c (4) | payload length (4) | segment sequence (8) | type (1) | payload
//
// all little-endian; the CRC covers everything after itself. A segment is a file of
// SegmentSize zeros before its first record (written ahead, off the write path) or an
// older segment recycled; either way a synced append overwrites blocks already
// allocated and written, so fdatasync commits data only, never the file's growth.
// Reading a segment stops at the first record that is all zeros, carries another
// segment's sequence (a recycled file's old content) or fails its CRC (a torn write).
const (
	headerSize = 17

	// recSave is a Ready's persisted part: hasHardState (1), then the HardState as
	// length (4) + bytes if present, then the entry count (4) and each entry as
	// length (4) + bytes.
	recSave = 1
	// recMark sets the truncation point: SnapshotMetadata as length (4) + bytes, then
	// an optional HardState as length (4) + bytes (length 0: none). Entries at or
	// before the point are discarded. Every segment starts with one, so the segments
	// before it can go once their entries are all truncated.
	recMark = 2
	// recReset is recMark that discards every entry: a snapshot was installed.
	recReset = 3
	// recSeal ends a segment; only the last segment may lack it.
	recSeal = 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// appendRecordHeader reserves a record header at the end of buf; finishRecord fills
// it in once the payload follows it.
func appendRecordHeader(buf []byte) []byte { return append(buf, make([]byte, headerSize)...) }

func finishRecord(rec []byte, seq uint64, typ byte) {
	binary.LittleEndian.PutUint32(rec[4:], uint32(len(rec)-headerSize))
	binary.LittleEndian.PutUint64(rec[8:], seq)
	rec[16] = typ
	binary.LittleEndian.PutUint32(rec[0:], crc32.Checksum(rec[4:], castagnoli))
}

// record is one record read back from a segment.
type record struct {
	typ     byte
	payload []byte
	seg     *segment
	off     int64 // of the payload in seg's file
}

// readSegment parses the records of a segment's content. end is where the next record
// would be written; torn reports that reading stopped at bytes that are neither zeros
// nor another segment's (a write interrupted by a crash).
func readSegment(seg *segment, data []byte) (recs []record, end int64, sealed, torn bool) {
	off := 0
	for off+headerSize <= len(data) {
		h := data[off : off+headerSize]
		n := int(binary.LittleEndian.Uint32(h[4:]))
		crc := binary.LittleEndian.Uint32(h[0:])
		seq := binary.LittleEndian.Uint64(h[8:])
		if crc == 0 && n == 0 && seq == 0 {
			break
		}
		if seq != seg.seq {
			break
		}
		if n > len(data)-off-headerSize || crc32.Checksum(data[off+4:off+headerSize+n], castagnoli) != crc {
			return recs, int64(off), false, true
		}
		recs = append(recs, record{typ: h[16], payload: data[off+headerSize : off+headerSize+n], seg: seg, off: int64(off + headerSize)})
		off += headerSize + n
		if h[16] == recSeal {
			return recs, int64(off), true, false
		}
	}
	return recs, int64(off), false, false
}

// segment is one open segment file.
type segment struct {
	seq      uint64
	f        vfs.File
	maxIndex uint64 // the highest entry index written to it
}

func segmentName(seq uint64) string { return fmt.Sprintf("%016x.wal", seq) }

// spareName is a zero-filled or recycled file waiting to become a segment.
func spareName(n uint64) string { return fmt.Sprintf("spare-%016x", n) }

const prepareSuffix = ".prepare"

// listDir sorts a log directory's files: segments by sequence, spares, and leftovers
// of a preparation interrupted by a crash.
func listDir(fs vfs.FS, dir string) (segs []uint64, spares []string, partial []string, err error) {
	names, err := fs.List(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	for _, name := range names {
		switch {
		case strings.HasSuffix(name, ".wal"):
			seq, err := strconv.ParseUint(strings.TrimSuffix(name, ".wal"), 16, 64)
			if err != nil || len(name) != 20 {
				return nil, nil, nil, fmt.Errorf("raftlog: unexpected file %s in %s", name, dir)
			}
			segs = append(segs, seq)
		case strings.HasPrefix(name, "spare-"):
			spares = append(spares, name)
		case strings.HasSuffix(name, prepareSuffix):
			partial = append(partial, name)
		}
	}
	sort.Slice(segs, func(i, j int) bool { return segs[i] < segs[j] })
	sort.Strings(spares)
	return segs, spares, partial, nil
}

// zeroChunk is written repeatedly to fill a file with zeros.
var zeroChunk = make([]byte, 1<<20)

// writeZeros overwrites [off, off+n) of f with zeros.
func writeZeros(f vfs.File, off, n int64) error {
	for n > 0 {
		c := min(n, int64(len(zeroChunk)))
		if _, err := f.WriteAt(zeroChunk[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

// prepareFile writes name as size zeros, synced, through a temporary name so a crash
// never leaves a half-written file under name.
func prepareFile(fs vfs.FS, dir, name string, size int64) error {
	tmp := fs.PathJoin(dir, name+prepareSuffix)
	f, err := fs.Create(tmp, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	for off := int64(0); off < size; off += int64(len(zeroChunk)) {
		if _, err := f.Write(zeroChunk[:min(size-off, int64(len(zeroChunk)))]); err != nil {
			f.Close()
			return err
		}
	}
	if err := errors.Join(f.Sync(), f.Close()); err != nil {
		return err
	}
	if err := fs.Rename(tmp, fs.PathJoin(dir, name)); err != nil {
		return err
	}
	return syncDir(fs, dir)
}

func syncDir(fs vfs.FS, dir string) error {
	d, err := fs.OpenDir(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}

// readAll reads a whole file.
func readAll(f vfs.File) ([]byte, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	data := make([]byte, st.Size())
	if _, err := f.ReadAt(data, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return data, nil
}

// payload readers: fixed 4-byte lengths, so a writer can fill a length in after the
// bytes it measures.

func appendLen(buf []byte) ([]byte, int) {
	return append(buf, 0, 0, 0, 0), len(buf)
}

func putLen(buf []byte, at int) {
	binary.LittleEndian.PutUint32(buf[at:], uint32(len(buf)-at-4))
}

// cutLen splits a length-prefixed field off p; ok is false when p is too short.
func cutLen(p []byte) (field, rest []byte, ok bool) {
	if len(p) < 4 {
		return nil, nil, false
	}
	n := int(binary.LittleEndian.Uint32(p))
	if n > len(p)-4 {
		return nil, nil, false
	}
	return p[4 : 4+n], p[4+n:], true
}
