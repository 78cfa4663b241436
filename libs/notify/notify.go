// Package notify is the wake-up that goroutines waiting for "something changed" share:
// a waiter takes the channel, looks at the state, and waits on the channel if it found
// nothing new; the next Notify closes it, so no change between the look and the wait
// is missed, and any number of waiters wake at once.
package notify

import "sync"

// Notifier wakes every goroutine waiting on its channel. The zero value is ready.
type Notifier struct {
	mu     sync.Mutex
	ch     chan struct{}
	closed bool
}

// C is a channel that is closed at the next Notify (or at Close). Take it before
// looking at the state it guards.
func (n *Notifier) C() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.ch == nil {
		n.ch = make(chan struct{})
	}
	return n.ch
}

// Notify wakes the goroutines waiting on the channels C returned.
func (n *Notifier) Notify() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return
	}
	if n.ch != nil {
		close(n.ch)
		n.ch = nil
	}
}

// Close wakes every waiter for good: C returns a closed channel from now on.
func (n *Notifier) Close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return
	}
	n.closed = true
	if n.ch == nil {
		n.ch = make(chan struct{})
	}
	close(n.ch)
}
