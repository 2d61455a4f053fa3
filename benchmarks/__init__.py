"""Speed benchmarks of the toolkit (``visedit bench``): ratios measured in one process.

Register new benchmarks with `benchmarks.bench.register`; `run_benchmarks` runs them all.
"""
from benchmarks.bench import BENCHMARKS, BenchContext, BenchOutput, Goal, register, run_benchmarks

__all__ = ["BENCHMARKS", "BenchContext", "BenchOutput", "Goal", "register", "run_benchmarks"]
