"""Side-by-side benchmarks of selfdistill: ``python -m benchmarks.run`` (see docs/performance.md)."""
