// Package signal tells waiters that something changed: a channel closed at
// each change and replaced, so any number of waiters see it without a
// subscription to cancel.
package signal

import "sync"

// Changes is ready to use; it must not be copied.
type Changes struct {
	mu sync.Mutex
	ch chan struct{}
}

// C returns a channel closed at the next Notify.
func (c *Changes) C() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ch == nil {
		c.ch = make(chan struct{})
	}
	return c.ch
}

// Notify wakes everyone waiting on a channel from C.
func (c *Changes) Notify() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ch != nil {
		close(c.ch)
		c.ch = nil
	}
}
