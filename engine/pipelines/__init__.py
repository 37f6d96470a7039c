"""Pipelines: the Engine and the pieces of a generate call (request checks, conditioning, guidance,
the denoising loop, output), and quantized export."""
