"""Probing the backends: scheduled probes and the confirmation of a failure the kernel reported."""
