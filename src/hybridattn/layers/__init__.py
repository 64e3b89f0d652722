"""nn.Modules built on the ops: mixers (softmax and linear), norms, positions, caches."""

from hybridattn.layers.attention import MultiHeadAttention
from hybridattn.layers.cache import Cache, KVCache, SlidingWindowKVCache
from hybridattn.layers.norms import GatedRMSNorm, RMSNorm
from hybridattn.layers.positions import LearnedPositionEmbedding, T5RelativeBias

__all__ = [
    "Cache",
    "GatedRMSNorm",
    "KVCache",
    "LearnedPositionEmbedding",
    "MultiHeadAttention",
    "RMSNorm",
    "SlidingWindowKVCache",
    "T5RelativeBias",
]
