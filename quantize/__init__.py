"""cogvx.quantize."""
