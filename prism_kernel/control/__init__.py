"""The control loop: lifecycle, the single writer to the kernel, passive feedback, reload, the state for `status`."""
