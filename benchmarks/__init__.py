"""Microbenchmark of circleloss-ext: the naive loss, torch.compile of it, the fused backend and the
matmul floor, over a grid of shapes. Run `python -m benchmarks.run`; see benchmarks/METHOD.md."""
