"""edgeseal device: enclave."""
