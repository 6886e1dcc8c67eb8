"""Endpoint sources: the configured endpoints (and their DNS names), and discovery from the API server's EndpointSlices."""
