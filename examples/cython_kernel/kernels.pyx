# cython: language_level=3
"""One integer kernel, compiled twice over: holding the GIL and releasing it (``nogil``).

The loop is the same C code in both; only ``with nogil`` differs. Threads take turns on
``spin_gil`` (so processes win) and run ``spin_nogil`` in parallel (so threads win, with
no pickling and no start-up). ``gs.advise`` tells them apart by measuring, not by name.
"""


cdef unsigned long long _mix(unsigned long long n) noexcept nogil:
    cdef unsigned long long x = 88172645463325252ULL
    cdef unsigned long long i
    for i in range(n):
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
    return x


def spin_gil(unsigned long long n):
    """``n`` rounds of xorshift with the GIL held: other threads wait."""
    return _mix(n)


def spin_nogil(unsigned long long n):
    """The same rounds with the GIL released: other threads run meanwhile."""
    cdef unsigned long long out
    with nogil:
        out = _mix(n)
    return out
