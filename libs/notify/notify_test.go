package notify

import (
	"testing"
	"time"
)

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func TestNotifier(t *testing.T) {
	var n Notifier
	a, b := n.C(), n.C()
	if closed(a) || a != b {
		t.Fatal("before Notify: the channel is closed, or two waiters got different channels")
	}
	n.Notify()
	if !closed(a) {
		t.Fatal("Notify did not close the waiters' channel")
	}
	c := n.C()
	if closed(c) {
		t.Fatal("the channel taken after Notify is already closed")
	}
	n.Notify()
	n.Notify() // nothing waits: no panic, nothing to close twice
	if !closed(c) {
		t.Fatal("the second Notify did not close the next channel")
	}

	woke := make(chan struct{})
	d := n.C()
	go func() { <-d; close(woke) }()
	n.Close()
	select {
	case <-woke:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake a waiter")
	}
	if !closed(n.C()) {
		t.Fatal("after Close, C is not closed")
	}
	n.Notify() // after Close: nothing happens
}
