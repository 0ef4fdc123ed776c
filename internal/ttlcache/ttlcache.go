// Package ttlcache is a size-bounded LRU whose entries expire a fixed time
// after they were added. It runs no goroutine (golang-lru's expirable LRU
// runs one that nothing stops): an expired entry is dropped when it is
// looked up, or evicted as the least recently used.
package ttlcache

import (
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
)

// Cache maps keys to values for ttl each.
type Cache[K comparable, V any] struct {
	ttl time.Duration
	c   *lru.Cache[K, entry[V]]
}

type entry[V any] struct {
	v     V
	until time.Time
}

// New returns a cache of at most size entries (at least one), each kept for
// ttl.
func New[K comparable, V any](size int, ttl time.Duration) *Cache[K, V] {
	c, _ := lru.New[K, entry[V]](max(size, 1)) // size > 0 cannot fail
	return &Cache[K, V]{ttl: ttl, c: c}
}

// Add sets k to v, for ttl from now.
func (c *Cache[K, V]) Add(k K, v V) {
	c.c.Add(k, entry[V]{v: v, until: time.Now().Add(c.ttl)})
}

// Get returns k's value, if it has not expired.
func (c *Cache[K, V]) Get(k K) (V, bool) {
	e, ok := c.c.Get(k)
	if ok && time.Now().Before(e.until) {
		return e.v, true
	}
	if ok {
		c.c.Remove(k)
	}
	var zero V
	return zero, false
}

// Contains says whether k has a value that has not expired, without
// making it the most recently used.
func (c *Cache[K, V]) Contains(k K) bool {
	e, ok := c.c.Peek(k)
	return ok && time.Now().Before(e.until)
}

// Remove drops k.
func (c *Cache[K, V]) Remove(k K) { c.c.Remove(k) }
