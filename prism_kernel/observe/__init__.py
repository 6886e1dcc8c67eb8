"""What operators see: metrics, `status`, `doctor`."""
