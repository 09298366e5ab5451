"""The end-to-end scenario suites (a package so the emulator can import ``scenarios.hooks``)."""
