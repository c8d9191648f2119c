"""Wrapping a network for quantization: BN folding, quantized layers, the model wrapper
and the block partition used by block reconstruction."""

from qcalib.model.fold import find_conv_bn_pairs, fold_bn
from qcalib.model.partition import Block, BlockKind, partition_blocks
from qcalib.model.qmodules import QuantConv2d, QuantLinear, QuantModule, is_quantizable
from qcalib.model.wrap import ObserverFactory, QuantModel, execution_order, quantize_model

__all__ = [
    "Block",
    "BlockKind",
    "ObserverFactory",
    "QuantConv2d",
    "QuantLinear",
    "QuantModel",
    "QuantModule",
    "execution_order",
    "find_conv_bn_pairs",
    "fold_bn",
    "is_quantizable",
    "partition_blocks",
    "quantize_model",
]
