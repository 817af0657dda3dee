"""On-disk and wire formats: pure encode/decode, versioned, one module per format."""
