"""edgeseal gateway."""
