"""tritonorm's benchmark suite (run with ``tritonorm bench`` or ``make bench``; see docs/benchmarks.md)."""
