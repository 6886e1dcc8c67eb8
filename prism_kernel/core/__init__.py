"""The pure core: the model, health, selection and the plans written to the kernel.

No I/O, no clock, no kernel: everything here is tested without root."""
