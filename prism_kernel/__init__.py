"""prism-kernel: a highly available Kubernetes API endpoint at 127.0.0.1:7445,
steered by the kernel (eBPF connect-time rewrite or nftables DNAT).

Pipeline, one module each: endpoints (sources) -> probes -> health (per-endpoint
state) -> selection (pure) -> datapath (kernel) -> status/metrics.
"""

__version__ = "0.1.0"
