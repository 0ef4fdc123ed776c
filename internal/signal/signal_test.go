package signal

import "testing"

func TestChanges(t *testing.T) {
	var c Changes
	c.Notify() // nobody waits: nothing to close
	a, b := c.C(), c.C()
	if a != b {
		t.Fatal("two waiters before a change got different channels")
	}
	select {
	case <-a:
		t.Fatal("closed before a change")
	default:
	}
	c.Notify()
	<-a
	next := c.C()
	select {
	case <-next:
		t.Fatal("a channel taken after the change is closed already")
	default:
	}
}
