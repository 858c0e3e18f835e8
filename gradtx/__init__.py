"""gradtx: small, pure, composable gradient transformations for JAX."""

from gradtx.base import EmptyState, GradientTransformation, identity, set_to_zero
from gradtx.combine import MaskedNode, MaskedState, PartitionState, apply_updates, chain, masked, named_chain, partition
from gradtx.transforms.scaling import scale, scale_by_learning_rate, scale_by_schedule

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "MaskedNode",
    "MaskedState",
    "PartitionState",
    "apply_updates",
    "chain",
    "identity",
    "masked",
    "named_chain",
    "partition",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "set_to_zero",
]
