"""Optimizer state on device meshes: placement that follows the parameters, and ZeRO-1 sharding."""
