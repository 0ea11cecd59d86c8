# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Token buckets in one open-addressing table over a C array: no Python object per bucket.

A bucket is (key, tokens, last refill, capacity, rate). Refill is computed on access from the
monotonic clock, so idle buckets cost nothing. Keys are 64-bit hashes of the identity (the
caller hashes; 0 is reserved). Linear probing with backward-shift deletion keeps lookups short
without tombstones.

Memory is bounded by `capacity` slots, fixed at construction. A bucket that has refilled to its
capacity is indistinguishable from a missing one, so such buckets (idle at least `idle_ttl`)
are reclaimed when room is needed and by `reclaim()`. If the table is still full, `take` on a
new key returns FULL: callers deny (fail closed), so a flood of new identities can neither grow
memory nor slip past the limits.
"""
from libc.math cimport INFINITY
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

FULL = -INFINITY  # returned by take() for a new key when the table has no room


cdef inline double monotonic() nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef struct Bucket:
    uint64_t key        # 0 = empty slot
    double tokens
    double last         # monotonic time of the last refill
    double capacity
    double rate         # tokens per second


cdef class BucketTable:
    cdef Bucket* slots
    cdef Py_ssize_t size, mask, used, max_used
    cdef public double idle_ttl
    cdef public unsigned long long reclaimed, rejected_full

    def __cinit__(self, Py_ssize_t capacity=1 << 16, double idle_ttl=60.0):
        cdef Py_ssize_t size = 16
        while size * 3 < capacity * 4:  # keep the load factor at or below 3/4
            size <<= 1
        self.slots = <Bucket*>calloc(size, sizeof(Bucket))
        if self.slots == NULL:
            raise MemoryError()
        self.size, self.mask, self.used, self.max_used = size, size - 1, 0, capacity
        self.idle_ttl = idle_ttl

    def __dealloc__(self):
        free(self.slots)

    def __len__(self):
        return self.used

    @property
    def capacity(self):
        return self.max_used

    cdef inline Py_ssize_t _find(self, uint64_t key):
        """Slot holding key, or the empty slot where it would go."""
        cdef Py_ssize_t i = key & self.mask
        while self.slots[i].key != 0 and self.slots[i].key != key:
            i = (i + 1) & self.mask
        return i

    cdef void _delete(self, Py_ssize_t i):
        cdef Py_ssize_t j = i, home
        while True:
            self.slots[i].key = 0
            while True:
                j = (j + 1) & self.mask
                if self.slots[j].key == 0:
                    self.used -= 1
                    return
                home = self.slots[j].key & self.mask
                # j's entry may move into the hole at i unless its home lies cyclically in (i, j]
                if (i <= j and i < home <= j) or (i > j and (home > i or home <= j)):
                    continue
                break
            self.slots[i] = self.slots[j]
            i = j

    cpdef Py_ssize_t reclaim(self, double now=-1.0):
        """Drop buckets idle for idle_ttl that have refilled completely; returns how many."""
        if now < 0:
            now = monotonic()
        cdef Py_ssize_t i = 0, n = 0
        cdef Bucket* b
        while i < self.size:
            b = &self.slots[i]
            if b.key != 0 and now - b.last >= self.idle_ttl and \
                    b.tokens + (now - b.last) * b.rate >= b.capacity:
                self._delete(i)
                n += 1
                continue  # backward shift may have moved another entry into slot i
            i += 1
        self.reclaimed += n
        return n

    cpdef double take(self, uint64_t key, double n, double capacity, double rate, double now=-1.0):
        """Take n tokens. Returns the tokens left (>= 0) when allowed; when denied, minus the
        seconds until n tokens will be there (-inf if n exceeds capacity, or FULL)."""
        if now < 0:
            now = monotonic()
        if key == 0:
            key = 1
        cdef Py_ssize_t i = self._find(key)
        cdef Bucket* b = &self.slots[i]
        if b.key == 0:
            if self.used >= self.max_used:
                if self.reclaim(now) == 0:
                    self.rejected_full += 1
                    return FULL
                i = self._find(key)
                b = &self.slots[i]
            b.key, b.tokens, b.last = key, capacity, now
            self.used += 1
        b.capacity, b.rate = capacity, rate  # limits may change with a config reload
        if now > b.last:
            b.tokens = min(capacity, b.tokens + (now - b.last) * rate)
            b.last = now
        if b.tokens >= n:
            b.tokens -= n
            return b.tokens
        if n > capacity or rate <= 0:
            return -INFINITY
        return -((n - b.tokens) / rate)

    cpdef double refund(self, uint64_t key, double n):
        """Give back n tokens reserved earlier (capped at capacity); returns the new level."""
        if key == 0:
            key = 1
        cdef Bucket* b = &self.slots[self._find(key)]
        if b.key == 0:
            return -1.0  # reclaimed meanwhile: it is full anyway
        b.tokens = min(b.capacity, b.tokens + n)
        return b.tokens

    cpdef double wait_time(self, uint64_t key, double n, double capacity, double rate, double now=-1.0):
        """Seconds until n tokens are available for key, taking nothing (inf if never)."""
        if n > capacity or rate <= 0:
            return INFINITY
        cdef double have = self.level(key, now)
        if have < 0:
            have = capacity  # no bucket yet: a new one starts full
        return 0.0 if have >= n else (n - have) / rate

    cpdef double level(self, uint64_t key, double now=-1.0):
        """Tokens available now for key (capacity of a missing bucket is unknown: -1)."""
        if now < 0:
            now = monotonic()
        if key == 0:
            key = 1
        cdef Bucket* b = &self.slots[self._find(key)]
        if b.key == 0:
            return -1.0
        return min(b.capacity, b.tokens + max(0.0, now - b.last) * b.rate)

    def take_batch(self, const uint64_t[::1] keys, const double[::1] n, const double[::1] capacity,
                   const double[::1] rate, double[::1] out):
        """take() for many checks at once (the owner answers a whole frame of them): out[i]
        gets what take(keys[i], n[i], capacity[i], rate[i]) would return. One clock read."""
        cdef double now = monotonic()
        cdef Py_ssize_t i
        for i in range(keys.shape[0]):
            out[i] = self.take(keys[i], n[i], capacity[i], rate[i], now)

    cpdef list take_list(self, list checks):
        """take() for each [key, n, capacity, rate] in checks (the shape the mesh carries),
        in one call with one clock read; returns the results in order."""
        cdef double now = monotonic()
        cdef list out = []
        for c in checks:
            out.append(self.take(c[0], c[1], c[2], c[3], now))
        return out
