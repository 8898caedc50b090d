"""The GPU report: one prepared command for a lent GPU (docs/benchmarks.md, "The GPU run").

    python -m tritonorm.gpu_report --out $OUT [--dry-run] [--budget-s 480]

``main``: the stages and their budgets; ``selection``: the compiled test subset;
``bench_stage`` / ``check_stage``: the benchmark rows and the launch / JIT-variant checks, each
run in its own process; ``summary``: the joined tables, the plot and the closing summary;
``proc``: the streamed log, child processes with time limits, the out dir's 8-file rule.
"""
