"""Development models: the tiny demo/test checkpoint, its tokenizer, and random-weight presets."""
