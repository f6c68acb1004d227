"""Benchmarks users can run: `clipjax-bench loss|data|compile|train|vocab|patches ...`."""
