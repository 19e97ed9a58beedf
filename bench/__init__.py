"""Benchmarks for the proxy: ``python -m bench [S1 S2 S3 S4 S5 clients] [--quick]``.

Every run starts its own processes on loopback (the fake upstream, the proxy, a private
redis-server, nginx when installed) and measures the proxy against baselines taken in the
same run, so that a noisy machine shows up in the ratios and not only in the numbers.
"""

from __future__ import annotations
