"""edgeseal device: rot."""
