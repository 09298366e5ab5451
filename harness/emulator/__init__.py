"""The emulated AWS IoT Core endpoint: broker, registry, provisioning, control plane."""
