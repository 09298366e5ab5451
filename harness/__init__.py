"""fleetbench: an end-to-end test harness for AWS IoT fleet provisioning."""

__version__ = "0.1.0"
