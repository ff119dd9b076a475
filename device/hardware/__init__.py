"""edgeseal device: hardware."""
