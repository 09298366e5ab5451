"""Root conftest: the fleetbench pytest plugin is loaded through its pytest11 entry point."""
