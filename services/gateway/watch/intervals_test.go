package watch

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// The index answers what a scan of every range answers, through random adds and
// removals of ranges that overlap, nest, share starts and run to the keyspace's end.
func TestIntervalsMatchAScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	key := func() []byte { return []byte{byte('a' + rng.IntN(12)), byte('a' + rng.IntN(3))} }
	var ix intervals
	live := map[*watcher]bool{}
	for step := range 20000 {
		if len(live) > 0 && rng.IntN(3) == 0 {
			for w := range live {
				ix.remove(w)
				delete(live, w)
				break
			}
		} else {
			a, b := key(), key()
			if string(b) < string(a) {
				a, b = b, a
			}
			if rng.IntN(5) == 0 {
				b = []byte{} // to the end of the keyspace
			} else if string(a) == string(b) {
				b = append(b, 0)
			}
			w := &watcher{id: int64(step), key: a, end: b}
			ix.add(w)
			live[w] = true
		}
		if ix.len() != len(live) {
			t.Fatalf("step %d: the index holds %d, want %d", step, ix.len(), len(live))
		}
		k := key()
		var got, want []int64
		ix.stab(k, func(w *watcher) { got = append(got, w.id) })
		for w := range live {
			if w.matches(k) {
				want = append(want, w.id)
			}
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("step %d: stab(%q) = %v, a scan finds %v", step, k, got, want)
		}
	}
	ix.remove(&watcher{key: []byte("zz"), end: []byte{}}) // not there: nothing happens
}

// BenchmarkIntervalsStab is one key's lookup among n prefix watchers of other
// prefixes and one that matches: its cost grows as log n, not as n.
func BenchmarkIntervalsStab(b *testing.B) {
	for _, n := range []int{1000, 10000, 100000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			var ix intervals
			for i := range n {
				p := fmt.Sprintf("/prefix/%06d/", i)
				ix.add(&watcher{key: []byte(p), end: []byte(p[:len(p)-1] + "0")})
			}
			key := []byte("/prefix/000777/k")
			b.ResetTimer()
			for range b.N {
				found := 0
				ix.stab(key, func(*watcher) { found++ })
				if found != 1 {
					b.Fatalf("found %d", found)
				}
			}
		})
	}
}
