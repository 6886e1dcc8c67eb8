"""The eBPF data path: cgroup connect4/connect6 rewrite, sock_ops outcome counters."""
