from hybridattn.ops.feature_maps import FavorPlusFeatures
from hybridattn.ops.gla import gla
from hybridattn.ops.linear_attention import linear_attention
from hybridattn.ops.simple_gla import retention, simple_gla
from hybridattn.ops.softmax_attention import softmax_attention
