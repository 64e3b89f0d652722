"""Built-in sequence mixers; importing this package registers them (see ``hybridattn.layers.registry``).

One file per mixer: ``attention`` (softmax), ``gated_deltanet`` (Qwen3-Next), ``deltanet``, ``gla``,
``retention``, ``mamba2``, ``linear`` (feature-map linear attention: elu+1, FAVOR+, Based), ``conv_attention``
(attention behind a short causal conv), and the sparse mixers.
"""

from hybridattn.layers.mixers import attention, deltanet, gated_deltanet, gla, linear, mamba2, retention  # noqa: F401
from hybridattn.layers.mixers import sparse  # noqa: F401  (sliding_window, longformer, bigbird, dsa, linformer, lsh)
from hybridattn.layers.mixers import conv_attention  # noqa: F401  (attention behind a short conv: zoology's MQAR baseline)
