"""edgeseal device: normal_world."""
