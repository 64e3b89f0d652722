"""Built-in sequence mixers; importing this package registers them (see ``hybridattn.layers.registry``).

One file per mixer: ``attention`` (softmax), ``gated_deltanet`` (Qwen3-Next), ``deltanet``, ``gla``,
``retention``, ``mamba2``, ``linear`` (feature-map linear attention: elu+1, FAVOR+, Based).
"""

from hybridattn.layers.mixers import attention, deltanet, gated_deltanet, gla, linear, mamba2, retention  # noqa: F401
from hybridattn.layers.mixers import sparse  # noqa: F401  (sliding_window, longformer, bigbird, dsa, linformer, lsh)
