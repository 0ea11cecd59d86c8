# cython: language_level=3
"""Structural pre-scan of a JSON body before it reaches the parser.

orjson recurses up to a fixed depth of its own and accepts number literals of any length; the
gateway's limits are config, so one linear pass checks nesting depth and number-literal length
first. It skips string contents (honouring escapes) and never allocates.
"""

OK = 0
TOO_DEEP = 1
NUMBER_TOO_LONG = 2


def scan(bytes data, int max_depth, int max_number_chars):
    """Return (code, offset): code is OK, TOO_DEEP or NUMBER_TOO_LONG; offset the byte it tripped on."""
    cdef const unsigned char* buf = data
    cdef Py_ssize_t i = 0, n = len(data), num_start = -1
    cdef int depth = 0
    cdef unsigned char c
    cdef bint in_str = False
    while i < n:
        c = buf[i]
        if in_str:
            if c == 92:        # backslash: skip the escaped byte
                i += 1
            elif c == 34:      # closing quote
                in_str = False
        elif c == 34:
            in_str = True
            num_start = -1
        elif c == 123 or c == 91:   # { [
            depth += 1
            if depth > max_depth:
                return TOO_DEEP, i
            num_start = -1
        elif c == 125 or c == 93:   # } ]
            depth -= 1
            num_start = -1
        elif (48 <= c <= 57) or c == 45 or c == 43 or c == 46 or c == 101 or c == 69:
            if num_start < 0:
                num_start = i
            if i - num_start + 1 > max_number_chars:
                return NUMBER_TOO_LONG, num_start
        else:
            num_start = -1
        i += 1
    return OK, -1
