"""edgeseal provisioning."""
