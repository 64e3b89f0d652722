"""hybridattn: attention mechanisms and hybrid (linear + softmax) transformer models.

Tensors are ``[B, T, H, D]`` (batch, time, heads, head dim) throughout, as in flash-attn and fla.
"""

__version__ = "0.1.0"
