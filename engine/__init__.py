"""cogvx.engine."""
