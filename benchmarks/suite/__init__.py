"""Side-by-side benchmarks of walsvc and the systems a user would pick instead (see harness.py)."""
