package mvcc

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Key layout (first byte of every key the store writes):
//
//	'c' key                        → latest KeyValue of a live key (current reads)
//	'i' esc(key) ^main             → kind byte + sub: the history index, newest first
//	'r' main sub                   → kind byte + KeyValue: every change in revision order
//	'm' name                       → store metadata (current and compacted revisions)
//
// esc(key) escapes 0x00 as 0x00 0xFF and ends with 0x00 0x01, which keeps byte order
// between escaped keys and makes every index entry of one key contiguous even when keys
// contain zero bytes or are prefixes of each other. Revisions are big-endian, inverted
// in the index so the newest version of a key sorts first.
const (
	prefixCurrent byte = 'c'
	prefixIndex   byte = 'i'
	prefixMeta    byte = 'm'
	prefixRev     byte = 'r'

	kindPut    byte = 'p'
	kindDelete byte = 'd'
)

var (
	metaRevKey       = []byte("mr") // current revision
	metaCompactKey   = []byte("mc") // scheduled compaction revision
	metaCompactedKey = []byte("mf") // last compaction revision whose deletion finished

	// spaceLower and spaceUpper bound every key of the store.
	spaceLower = []byte{prefixCurrent}
	spaceUpper = []byte{prefixRev + 1}
)

func currentKey(key []byte) []byte {
	k := make([]byte, 1+len(key))
	k[0] = prefixCurrent
	copy(k[1:], key)
	return k
}

func revKey(main, sub int64) []byte {
	k := make([]byte, 17)
	k[0] = prefixRev
	binary.BigEndian.PutUint64(k[1:], uint64(main))
	binary.BigEndian.PutUint64(k[9:], uint64(sub))
	return k
}

func parseRevKey(k []byte) (main, sub int64) {
	return int64(binary.BigEndian.Uint64(k[1:9])), int64(binary.BigEndian.Uint64(k[9:17]))
}

// indexKeyPrefix is 'i' + esc(key): the prefix of every index entry of key.
func indexKeyPrefix(key []byte) []byte {
	k := make([]byte, 0, len(key)+12)
	k = append(k, prefixIndex)
	k = appendEscaped(k, key)
	return append(k, 0x00, 0x01)
}

func appendEscaped(dst, key []byte) []byte {
	for _, c := range key {
		if c == 0 {
			dst = append(dst, 0x00, 0xFF)
		} else {
			dst = append(dst, c)
		}
	}
	return dst
}

// indexBound is 'i' + esc(key) without terminator: every index entry of a key ≥ key
// sorts at or after it, every entry of a key < key sorts before it.
func indexBound(key []byte) []byte {
	return appendEscaped([]byte{prefixIndex}, key)
}

func indexKey(key []byte, main int64) []byte {
	k := indexKeyPrefix(key)
	return binary.BigEndian.AppendUint64(k, ^uint64(main))
}

// splitIndexKey returns the prefix ('i' + esc(key) + terminator) and the revision.
func splitIndexKey(k []byte) (prefix []byte, main int64) {
	if len(k) < 11 || k[0] != prefixIndex {
		panic(fmt.Sprintf("mvcc: %q is not an index key", k))
	}
	n := len(k) - 8
	return k[:n], int64(^binary.BigEndian.Uint64(k[n:]))
}

// nextIndexKey is the smallest index key after every entry with this prefix.
func nextIndexKey(prefix []byte) []byte {
	k := bytes.Clone(prefix)
	k[len(k)-1] = 0x02
	return k
}

func encodeInt(v int64) []byte { return binary.BigEndian.AppendUint64(nil, uint64(v)) }

func decodeInt(b []byte) int64 {
	if len(b) != 8 {
		return 0
	}
	return int64(binary.BigEndian.Uint64(b))
}
