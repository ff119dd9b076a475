"""edgeseal device."""
