"""Model architectures, the registry that picks one from config.architectures, and layer partitions."""

from strata.model.architectures.partition import check_partition, even_layer_partition, layer_range_for_stage
from strata.model.architectures.registry import check_tp_compatible, get_model_class, supported_architectures

__all__ = [
    "check_partition",
    "check_tp_compatible",
    "even_layer_partition",
    "get_model_class",
    "layer_range_for_stage",
    "supported_architectures",
]
