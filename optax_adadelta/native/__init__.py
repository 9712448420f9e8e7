"""The native CPU layer (its API is being moved here from _native.py, issue #24)."""
