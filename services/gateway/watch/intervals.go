package watch

import (
	"bytes"
	"math/rand/v2"
	"unsafe"
)

// intervals indexes range watchers by their key ranges, for the question every revision
// asks of each of its keys: which watchers' ranges hold it. It is a treap ordered by
// range start (ties by the watcher's address), each node carrying the largest end in
// its subtree, as etcd's adt.IntervalTree: a lookup costs O(log n) plus the watchers it
// finds, whatever the number of watchers that do not match.
//
// A range is [w.key, w.end); an empty w.end runs to the end of the keyspace.
type intervals struct {
	root *ivNode
	n    int
}

type ivNode struct {
	w           *watcher
	prio        uint64
	left, right *ivNode
	// maxEnd is the largest end in the subtree; maxInf when one of them is the end of
	// the keyspace.
	maxEnd []byte
	maxInf bool
}

// before orders nodes: by start, then by address (a watcher is in an index once).
func before(a, b *watcher) bool {
	if c := bytes.Compare(a.key, b.key); c != 0 {
		return c < 0
	}
	return uintptr(unsafe.Pointer(a)) < uintptr(unsafe.Pointer(b))
}

func (n *ivNode) fix() {
	n.maxEnd, n.maxInf = n.w.end, len(n.w.end) == 0
	for _, c := range [2]*ivNode{n.left, n.right} {
		switch {
		case c == nil || n.maxInf:
		case c.maxInf:
			n.maxEnd, n.maxInf = nil, true
		case bytes.Compare(c.maxEnd, n.maxEnd) > 0:
			n.maxEnd = c.maxEnd
		}
	}
}

// split divides t into the nodes ordered before w and the others.
func split(t *ivNode, w *watcher) (l, r *ivNode) {
	if t == nil {
		return nil, nil
	}
	if before(t.w, w) {
		t.right, r = split(t.right, w)
		t.fix()
		return t, r
	}
	l, t.left = split(t.left, w)
	t.fix()
	return l, t
}

// merge joins l and r, every node of l ordered before every node of r.
func merge(l, r *ivNode) *ivNode {
	switch {
	case l == nil:
		return r
	case r == nil:
		return l
	case l.prio > r.prio:
		l.right = merge(l.right, r)
		l.fix()
		return l
	default:
		r.left = merge(l, r.left)
		r.fix()
		return r
	}
}

// add indexes w.
func (ix *intervals) add(w *watcher) {
	n := &ivNode{w: w, prio: rand.Uint64()}
	n.fix()
	l, r := split(ix.root, w)
	ix.root = merge(merge(l, n), r)
	ix.n++
}

// remove drops w from the index (nothing when it is not there).
func (ix *intervals) remove(w *watcher) {
	var drop func(t *ivNode) *ivNode
	found := false
	drop = func(t *ivNode) *ivNode {
		switch {
		case t == nil:
			return nil
		case t.w == w:
			found = true
			return merge(t.left, t.right)
		case before(w, t.w):
			t.left = drop(t.left)
		default:
			t.right = drop(t.right)
		}
		t.fix()
		return t
	}
	ix.root = drop(ix.root)
	if found {
		ix.n--
	}
}

// len is the number of watchers indexed.
func (ix *intervals) len() int { return ix.n }

// each calls fn with every watcher in the index.
func (ix *intervals) each(fn func(*watcher)) { each(ix.root, fn) }

func each(n *ivNode, fn func(*watcher)) {
	for ; n != nil; n = n.right {
		each(n.left, fn)
		fn(n.w)
	}
}

// stab calls fn with every watcher whose range holds key.
func (ix *intervals) stab(key []byte, fn func(*watcher)) { stab(ix.root, key, fn) }

func stab(n *ivNode, key []byte, fn func(*watcher)) {
	for n != nil {
		if !n.maxInf && bytes.Compare(n.maxEnd, key) <= 0 {
			return // every range below ends at or before key
		}
		stab(n.left, key, fn)
		if bytes.Compare(n.w.key, key) > 0 {
			return // this range and those to its right start after key
		}
		if len(n.w.end) == 0 || bytes.Compare(key, n.w.end) < 0 {
			fn(n.w)
		}
		n = n.right
	}
}
