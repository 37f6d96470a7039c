"""cogvx.kernels."""
