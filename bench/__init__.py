"""prism-kernel benchmark: `python -m bench.run` (see bench/run.py).

wrk against one nginx backend in a network namespace, directly and through
each data path, in alternating rounds; see bench/README.md.
"""
