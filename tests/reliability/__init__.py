"""Reliability tests: hostile input, faults, crashes and concurrency (issue 13)."""
