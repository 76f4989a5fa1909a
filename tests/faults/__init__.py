"""Fault tests: real processes (redis-server, replicas) under load while something breaks."""
