# cython: language_level=3
"""Fixed-capacity ring buffers for the hot paths that keep bounded windows and queues.

Window: the last `capacity` samples (doubles) with a running sum, so mean, share over a
threshold and percentiles need no Python loop and a push allocates nothing: breaker outcome
windows, queueing-delay (sojourn) windows, latency windows. `extend` takes a whole batch of
samples in one call.
Ring: a bounded FIFO of Python objects (a slot array, no node per item): the per-class queues.
push() refuses when full (the caller sheds) instead of growing; push_many/pop_many move a
loop turn's items in one call.
"""
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.string cimport memcpy


cdef double _select(double* a, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """The k-th smallest of a[0..n) (reorders a): Hoare's quickselect, O(n) on average."""
    cdef Py_ssize_t lo = 0, hi = n - 1, i, j
    cdef double pivot, t
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


cdef class Window:
    cdef double* buf
    cdef Py_ssize_t cap, head, n
    cdef double total

    def __cinit__(self, Py_ssize_t capacity):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.buf = <double*>PyMem_Malloc(capacity * sizeof(double))
        if self.buf == NULL:
            raise MemoryError()
        self.cap, self.head, self.n, self.total = capacity, 0, 0, 0.0

    def __dealloc__(self):
        PyMem_Free(self.buf)

    cdef inline void _push(self, double x) noexcept:
        if self.n == self.cap:
            self.total -= self.buf[self.head]
        else:
            self.n += 1
        self.buf[self.head] = x
        self.total += x
        self.head += 1
        if self.head == self.cap:
            self.head = 0

    cpdef void push(self, double x):
        self._push(x)

    def extend(self, const double[:] xs):
        cdef Py_ssize_t i
        for i in range(xs.shape[0]):
            self._push(xs[i])

    cpdef void clear(self):
        self.head, self.n, self.total = 0, 0, 0.0

    def __len__(self):
        return self.n

    @property
    def capacity(self):
        return self.cap

    cpdef double sum(self):
        return self.total

    cpdef double mean(self):
        return self.total / self.n if self.n else 0.0

    cpdef double share_at_least(self, double threshold):
        """The share of samples >= threshold (0.0 when empty)."""
        cdef Py_ssize_t i, k = 0
        if self.n == 0:
            return 0.0
        for i in range(self.n):
            if self.buf[i] >= threshold:
                k += 1
        return <double>k / self.n

    cpdef double minimum(self):
        cdef Py_ssize_t i
        cdef double m
        if self.n == 0:
            return 0.0
        m = self.buf[0]
        for i in range(1, self.n):
            if self.buf[i] < m:
                m = self.buf[i]
        return m

    cpdef double percentile(self, double q):
        """The q-th percentile (0..100, nearest rank) of the samples (0.0 when empty)."""
        cdef Py_ssize_t rank
        cdef double out
        cdef double* tmp
        if self.n == 0:
            return 0.0
        tmp = <double*>PyMem_Malloc(self.n * sizeof(double))
        if tmp == NULL:
            raise MemoryError()
        memcpy(tmp, self.buf, self.n * sizeof(double))
        rank = <Py_ssize_t>(q / 100.0 * self.n + 0.999999) - 1
        rank = 0 if rank < 0 else (self.n - 1 if rank >= self.n else rank)
        out = _select(tmp, self.n, rank)
        PyMem_Free(tmp)
        return out


cdef class Ring:
    cdef PyObject** slots
    cdef Py_ssize_t cap, head, n

    def __cinit__(self, Py_ssize_t capacity):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.slots = <PyObject**>PyMem_Malloc(capacity * sizeof(PyObject*))
        if self.slots == NULL:
            raise MemoryError()
        self.cap, self.head, self.n = capacity, 0, 0

    def __dealloc__(self):
        while self.n:
            self.pop()
        PyMem_Free(self.slots)

    cpdef bint push(self, object item):
        """Append item; False (and nothing stored) when the ring is full."""
        if self.n == self.cap:
            return False
        Py_INCREF(item)
        self.slots[(self.head + self.n) % self.cap] = <PyObject*>item
        self.n += 1
        return True

    cpdef object pop(self):
        """The oldest item (IndexError when empty)."""
        cdef PyObject* p
        if self.n == 0:
            raise IndexError("pop from an empty Ring")
        p = self.slots[self.head]
        self.head = (self.head + 1) % self.cap
        self.n -= 1
        item = <object>p
        Py_DECREF(item)
        return item

    def push_many(self, items) -> int:
        """Append items in order until the ring is full; how many it took."""
        cdef list lst = items if type(items) is list else list(items)
        cdef Py_ssize_t i, m = len(lst)
        cdef object item
        if m > self.cap - self.n:
            m = self.cap - self.n
        for i in range(m):
            item = lst[i]
            Py_INCREF(item)
            self.slots[(self.head + self.n) % self.cap] = <PyObject*>item
            self.n += 1
        return m

    def pop_many(self, Py_ssize_t n) -> list:
        """Up to n oldest items, oldest first."""
        cdef Py_ssize_t i, m = n if n < self.n else self.n
        cdef list out = [None] * m
        cdef object item
        for i in range(m):
            item = <object>self.slots[self.head]  # a new reference: the slot's one is dropped below
            Py_DECREF(item)
            out[i] = item
            self.head += 1
            if self.head == self.cap:
                self.head = 0
        self.n -= m
        return out

    cpdef object peek(self):
        if self.n == 0:
            raise IndexError("peek at an empty Ring")
        return <object>self.slots[self.head]

    def __len__(self):
        return self.n

    @property
    def capacity(self):
        return self.cap

    @property
    def full(self):
        return self.n == self.cap
