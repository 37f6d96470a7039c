"""Runtime: devices and dtypes, torch.compile settings and cache, profiling."""
