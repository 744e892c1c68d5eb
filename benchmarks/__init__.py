"""vitlens benchmarks (issue 8): throughput and peak memory of the attention analyses against plain timm.

Run ``python -m benchmarks [--quick] [--device cpu|cuda] [--models a,b]``; results go to ``benchmarks/results/``.
Nothing here is a test and nothing asserts a time.
"""
