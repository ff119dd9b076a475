"""edgeseal device: attacks."""
