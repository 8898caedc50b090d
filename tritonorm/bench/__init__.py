"""tritonorm's benchmark suite, behind ``tritonorm bench`` (see docs/benchmarks.md).

``runner``: the entry point, provenance and the JSON file; ``gpu``: timed rows, summary, table;
``cpu``: the correctness-and-dispatch report run through Triton's interpreter where there is no
GPU; ``shapes``/``providers``/``bytes_model``/``timing``/``plots``: the pieces. It is part of
the installed package, so it runs from any directory.
"""
