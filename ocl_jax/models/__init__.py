"""ResNet encoders and the projector / predictor heads of docs/method.md#pretraining.

The encoder returns the layer4 feature map *before* pooling, and the heads
start from that map, so saliency code (ContraCAM) can differentiate a score
with respect to the feature map with the same parameters that training uses.

`dtype` ('float32' or 'bfloat16', config.model.dtype) is the compute dtype of
convolutions, BatchNorm and dense layers; parameters stay float32 (the master
weights the optimiser updates) and features, embeddings and predictions are
returned in float32, so losses are computed in float32.

Layout: cpu_ops (XLA:CPU workarounds), resnet (the trunk), heads (heads,
ContrastiveNet, ModelSpec); the public names are re-exported here.
"""

from ocl_jax.models.cpu_ops import max_pool, patch_conv
from ocl_jax.models.heads import (
    ContrastiveNet,
    MLPHead,
    ModelSpec,
    l2_normalize,
    random_variables,
)
from ocl_jax.models.resnet import (
    ARCHITECTURES,
    DTYPES,
    EXPAND_RES,
    BasicBlock,
    BottleneckBlock,
    Conv,
    ResNet,
    batch_norm,
    block_stride,
    check_expand_res,
    feature_dim,
    torch_default_init,
)

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "EXPAND_RES",
    "BasicBlock",
    "BottleneckBlock",
    "ContrastiveNet",
    "Conv",
    "MLPHead",
    "ModelSpec",
    "ResNet",
    "batch_norm",
    "block_stride",
    "check_expand_res",
    "feature_dim",
    "l2_normalize",
    "max_pool",
    "patch_conv",
    "random_variables",
    "torch_default_init",
]
