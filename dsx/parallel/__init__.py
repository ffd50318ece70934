"""Distributed dsx: compressed-gradient DDP hooks, sharding-aware transforms, distributed calibration, checkpoints."""
