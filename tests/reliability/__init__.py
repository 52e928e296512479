"""Reliability and security tests (issue 7): faults, bad input, signals, threads, leaks."""
