package streammux

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
)

type item struct{ n int }

// TestMessagesCarryWhatQueuedAndAnswersFindTheirItems queues items while a message is
// being sent: they go out together as the next one, in order, bounded by max; items
// are taken back one by one or by message.
func TestMessagesCarryWhatQueuedAndAnswersFindTheirItems(t *testing.T) {
	m := New[*item]()
	items := make([]*item, 10)
	for i := range items {
		items[i] = &item{n: i}
	}
	type sentMsg struct {
		seq   uint64
		items []*item
	}
	sent := make(chan sentMsg, 10)
	release := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		first := true
		done <- m.Run(ctx, 4, func(seq uint64, batch []*item) error {
			sent <- sentMsg{seq, slices.Clone(batch)}
			if first {
				first = false
				<-release // the next items queue up meanwhile
			}
			return nil
		})
	}()
	m.Add(items[0])
	first := <-sent
	for _, it := range items[1:] {
		m.Add(it)
	}
	close(release)
	got := []sentMsg{first, <-sent, <-sent, <-sent}
	want := [][]*item{items[0:1], items[1:5], items[5:9], items[9:10]}
	for i, g := range got {
		if !slices.Equal(g.items, want[i]) {
			t.Fatalf("message %d carried %v, want %v", i, g.items, want[i])
		}
	}
	// By item: the second message's third item.
	if it, ok := m.TakeItem(ItemID(got[1].seq, 2)); !ok || it != items[3] {
		t.Fatalf("TakeItem: %v %v, want item 3", it, ok)
	}
	if _, ok := m.TakeItem(ItemID(got[1].seq, 2)); ok {
		t.Fatal("an item was taken twice")
	}
	// By message.
	if its, ok := m.TakeMessage(got[2].seq); !ok || !slices.Equal(its, items[5:9]) {
		t.Fatalf("TakeMessage: %v %v", its, ok)
	}
	// Fail: the items still in flight (not taken) come back once.
	_, inFlight, firstFail := m.Fail()
	slices.SortFunc(inFlight, func(a, b *item) int { return a.n - b.n })
	if !firstFail || !slices.Equal(inFlight, []*item{items[0], items[1], items[2], items[4], items[9]}) {
		t.Fatalf("Fail returned %v in flight (first %v)", inFlight, firstFail)
	}
	if _, _, again := m.Fail(); again {
		t.Fatal("a second Fail returned items")
	}
	if m.Add(&item{}) {
		t.Fatal("Add after Fail succeeded")
	}
	if err := <-done; err != nil {
		t.Fatalf("Run after Fail: %v", err)
	}
}

// TestFailReturnsQueuedItemsAndSendErrorsEndRun: what never left is returned as queued;
// a send error ends Run with it.
func TestFailReturnsQueuedItemsAndSendErrorsEndRun(t *testing.T) {
	m := New[*item]()
	a, b := &item{1}, &item{2}
	m.Add(a)
	m.Add(b)
	queued, inFlight, _ := m.Fail()
	if !slices.Equal(queued, []*item{a, b}) || len(inFlight) != 0 {
		t.Fatalf("queued %v in flight %v", queued, inFlight)
	}

	m = New[*item]()
	boom := errors.New("boom")
	var wg sync.WaitGroup
	wg.Add(1)
	var err error
	go func() {
		defer wg.Done()
		err = m.Run(context.Background(), 8, func(uint64, []*item) error { return boom })
	}()
	m.Add(a)
	wg.Wait()
	if !errors.Is(err, boom) {
		t.Fatalf("Run: %v, want the send error", err)
	}
	if _, inFlight, _ := m.Fail(); !slices.Equal(inFlight, []*item{a}) {
		t.Fatalf("in flight after a failed send: %v", inFlight)
	}
}
