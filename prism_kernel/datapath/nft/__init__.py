"""The nftables data path: a DNAT map in its own table."""
