"""The kernel matrix: the data-path tests in QEMU guests on Debian's kernels (run.py)."""
