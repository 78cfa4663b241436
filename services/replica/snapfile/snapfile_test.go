package snapfile

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

func writeFile(t *testing.T, pairs [][2][]byte) (string, Meta) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "snap.db")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := NewWriter(f)
	for _, p := range pairs {
		if err := w.Add(p[0], p[1]); err != nil {
			t.Fatal(err)
		}
	}
	meta, size, err := w.Close(Meta{Version: "3.6.0", Revision: 42, TotalKey: int64(len(pairs))})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(path)
	if fi.Size() != size {
		t.Fatalf("Close reported %d bytes, file has %d", size, fi.Size())
	}
	// etcdctl's one check of a saved snapshot.
	if size%512 != 32 {
		t.Fatalf("size %d %% 512 = %d, etcdctl wants 32", size, size%512)
	}
	return path, meta
}

func TestRoundTrip(t *testing.T) {
	var pairs [][2][]byte
	for i := range 3000 {
		pairs = append(pairs, [2][]byte{[]byte(fmt.Sprintf("key-%05d", i)), bytes.Repeat([]byte{byte(i)}, i%700)})
	}
	pairs = append(pairs, [2][]byte{{0}, nil}) // a zero byte key, an empty value
	path, meta := writeFile(t, pairs)
	if meta.Pairs != uint64(len(pairs)) || meta.Hash == 0 {
		t.Fatalf("meta %+v", meta)
	}
	var got [][2][]byte
	rm, err := Read(path, func(k, v []byte) error {
		got = append(got, [2][]byte{bytes.Clone(k), bytes.Clone(v)})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if rm != meta {
		t.Fatalf("read meta %+v, wrote %+v", rm, meta)
	}
	if len(got) != len(pairs) {
		t.Fatalf("read %d pairs, wrote %d", len(got), len(pairs))
	}
	for i := range pairs {
		if !bytes.Equal(got[i][0], pairs[i][0]) || !bytes.Equal(got[i][1], pairs[i][1]) {
			t.Fatalf("pair %d differs", i)
		}
	}
}

func TestDamageIsRefusedBeforeAnyPairIsRead(t *testing.T) {
	path, _ := writeFile(t, [][2][]byte{{[]byte("a"), []byte("1")}, {[]byte("b"), []byte("2")}})
	orig, _ := os.ReadFile(path)
	cases := map[string][]byte{
		"truncated":       orig[:len(orig)-1],
		"truncated block": orig[:len(orig)-512],
		"flipped content": flip(orig, 20),
		"flipped trailer": flip(orig, len(orig)-1),
		"empty":           {},
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "bad.db")
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
			called := false
			_, err := Read(p, func(k, v []byte) error { called = true; return nil })
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("err = %v, want ErrCorrupt", err)
			}
			if called {
				t.Fatal("a pair of a damaged file reached the caller")
			}
		})
	}
}

func flip(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0xff
	return c
}

func TestNotASnapshot(t *testing.T) {
	// A file of the right size with a valid trailer but other content (an etcd
	// snapshot is a bbolt file) is refused by its magic.
	body := bytes.Repeat([]byte("x"), 1024)
	p := filepath.Join(t.TempDir(), "other.db")
	f, _ := os.Create(p)
	f.Write(body)
	sum := sha256Sum(body)
	f.Write(sum)
	f.Close()
	if _, err := Verify(p); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("err = %v, want ErrCorrupt", err)
	}
}

func sha256Sum(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}
