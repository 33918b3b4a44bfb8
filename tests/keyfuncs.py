"""Functions for the key-determinism tests, imported the ordinary way in every process.

Test modules are compiled by pytest's assertion rewriter, which changes
which of their strings are shared objects and so the exact bytes their
functions pickle to; a plain module pickles the same in every process.
Tests register this module with cloudpickle so it travels by value.
"""


def inc(x):
    return x + 1


def nested(n):
    """Holds code objects inside its own (a lambda, a comprehension): each has a file name."""
    return sum([(lambda v: v * v)(i) for i in range(n)])
