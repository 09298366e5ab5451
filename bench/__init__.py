"""Broker benchmarks: the emulator against mosquitto (see bench/README.md)."""
