// Package streammux carries many callers' items over one long-lived stream: items
// queued while the previous message was being written go out together as the next
// message, and the answers, which name the message (or an item of it), find their
// callers. The gateway's KV calls and keep-alives to a replica travel this way (KV
// Batch and KeepAlive streams).
package streammux

import (
	"context"
	"sync"
)

// MaxItems bounds the items of one message (an item's ID keeps its index in 16 bits).
const MaxItems = 1 << 16

// Mux is the queue and the in-flight messages of one stream. Items are comparable and
// never the zero value (pointers, in practice).
type Mux[T comparable] struct {
	wake chan struct{}

	mu    sync.Mutex
	queue []T
	sent  map[uint64]*message[T]
	seq   uint64
	dead  bool
}

type message[T comparable] struct {
	items []T
	left  int
}

// New returns an empty Mux.
func New[T comparable]() *Mux[T] {
	return &Mux[T]{wake: make(chan struct{}, 1), sent: make(map[uint64]*message[T])}
}

// Add queues item for the next message; false once the Mux has failed.
func (m *Mux[T]) Add(item T) bool {
	m.mu.Lock()
	if m.dead {
		m.mu.Unlock()
		return false
	}
	m.queue = append(m.queue, item)
	m.mu.Unlock()
	m.notify()
	return true
}

func (m *Mux[T]) notify() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// Run sends what is queued, as messages of at most max items (max ≤ MaxItems), until
// ctx ends, send fails (its error is returned) or the Mux fails. A message's items are
// in flight from before send is called: seq names the message, ItemID(seq, i) its i-th
// item.
func (m *Mux[T]) Run(ctx context.Context, max int, send func(seq uint64, items []T) error) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-m.wake:
		}
		m.mu.Lock()
		if m.dead {
			m.mu.Unlock()
			return nil
		}
		batch := m.queue
		if len(batch) > max {
			batch, m.queue = batch[:max], batch[max:]
			m.notify()
		} else {
			m.queue = nil
		}
		if len(batch) == 0 {
			m.mu.Unlock()
			continue
		}
		m.seq++
		seq := m.seq
		m.sent[seq] = &message[T]{items: batch, left: len(batch)}
		m.mu.Unlock()
		if err := send(seq, batch); err != nil {
			return err
		}
	}
}

// ItemID names the i-th item of message seq.
func ItemID(seq uint64, i int) uint64 { return seq<<16 | uint64(i) }

// TakeItem removes and returns the item named id, if it is in flight.
func (m *Mux[T]) TakeItem(id uint64) (T, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var zero T
	msg := m.sent[id>>16]
	i := int(id & (MaxItems - 1))
	if msg == nil || i >= len(msg.items) || msg.items[i] == zero {
		return zero, false
	}
	item := msg.items[i]
	msg.items[i] = zero
	if msg.left--; msg.left == 0 {
		delete(m.sent, id>>16)
	}
	return item, true
}

// TakeMessage removes and returns the items of message seq, if it is in flight.
func (m *Mux[T]) TakeMessage(seq uint64) ([]T, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	msg := m.sent[seq]
	if msg == nil {
		return nil, false
	}
	delete(m.sent, seq)
	return msg.items, true
}

// Fail ends the Mux: Add refuses from now on and Run returns. The first call returns
// what was queued (never sent) and what was in flight (sent, unanswered); later calls
// return nothing and false.
func (m *Mux[T]) Fail() (queued, sent []T, first bool) {
	m.mu.Lock()
	if m.dead {
		m.mu.Unlock()
		return nil, nil, false
	}
	m.dead = true
	queued = m.queue
	for _, msg := range m.sent {
		if msg.left == len(msg.items) {
			sent = append(sent, msg.items...)
			continue
		}
		var zero T
		for _, it := range msg.items {
			if it != zero { // taken ones are zeroed
				sent = append(sent, it)
			}
		}
	}
	m.queue, m.sent = nil, nil
	m.mu.Unlock()
	m.notify()
	return queued, sent, true
}

// Dead tells whether the Mux has failed.
func (m *Mux[T]) Dead() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.dead
}
