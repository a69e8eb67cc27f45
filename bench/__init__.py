"""Benchmarks of the framework (`make bench`): speed, size and quality tables written to outputs/bench/.

They use the library's public functions and are never imported by it.
"""
