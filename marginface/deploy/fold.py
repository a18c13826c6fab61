"""Inference graph rewrites (BatchNorm folding, PReLU as Max, thin-group conv regrouping): they live
in `marginface.models.fold` (evaluation runs them too); this module keeps the names where
deployment code and users import them."""
from marginface.models.fold import (
    MaxFormPReLU, bn_affine, count_batchnorm, fold_batchnorm, fold_into, regroup_conv, regroup_thin_convs,
    rewrite_prelu,
)

__all__ = ["MaxFormPReLU", "bn_affine", "count_batchnorm", "fold_batchnorm", "fold_into", "regroup_conv",
           "regroup_thin_convs", "rewrite_prelu"]
