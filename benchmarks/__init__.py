"""Benchmarks of optax_adadelta against its peers and against this machine's limit.

Run from the repository root, e.g. ``python -m benchmarks.step --smoke`` (see README.md here).
Never imported by the tests.
"""
