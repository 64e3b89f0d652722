from hybridattn.ops.delta_rule import delta_rule, naive_recurrent_delta_rule
from hybridattn.ops.gated_delta_rule import gated_delta_rule, naive_recurrent_gated_delta_rule
from hybridattn.ops.softmax_attention import softmax_attention
from hybridattn.ops.feature_maps import FavorPlusFeatures
from hybridattn.ops.gla import gla
from hybridattn.ops.linear_attention import linear_attention
from hybridattn.ops.simple_gla import retention, simple_gla
from hybridattn.ops.block_sparse_attention import block_sparse_attention
from hybridattn.ops.dsa_attention import dsa_attention
from hybridattn.ops.linformer import linformer_attention
from hybridattn.ops.lsh_attention import lsh_attention
from hybridattn.ops.attention_variants import (attention_with_sinks, bahdanau_attention, luong_dot_attention,
                                              luong_general_attention, softcap_attention)
