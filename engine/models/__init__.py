"""The models: configs and presets, the transformer, the VAE, the T5 text path, the schedulers and the
noise they share. Nothing here reads a file; ``cogvx.engine.loading`` builds these from checkpoints."""
