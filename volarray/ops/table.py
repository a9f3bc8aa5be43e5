"""What each op a capture can call becomes: one registration per op, the one place to
add one.

Keys are what a captured node calls: module classes (the torch.fx capture), torch
functions and ATen ops (torch.export's capture, lowered by `volarray.capture` as the
``lowering`` of each registration says), tensor method names. ``per_voxel`` marks the
ops that may run inside a channels-last block (`volarray.layout`). Adding an op: its
kernel and builder in one module of `volarray.ops`, and one registration here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import channels, conv, dropout, flip, norm, pad, pointwise, pool, reduce, resample
from .registry import Const, Registry

aten = torch.ops.aten
OPS = Registry()
reg = OPS.register
CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
NORM = ("input", "running_mean", "running_var", "weight", "bias")
DROP = ("input", "p", "train")
INTERPOLATE = ("input", "output_size", "scale_factors")

# convolutions, pooling, resampling, padding: local ops with a halo or a scale
reg(conv.conv_module, modules=[nn.Conv3d])
reg(conv.conv_function, functions=[F.conv3d, torch.conv3d],
    lowering={aten.conv3d.default: (F.conv3d, CONV), aten.conv3d.padding: (F.conv3d, CONV)})
reg(conv.conv_transpose_module, modules=[nn.ConvTranspose3d])
reg(conv.conv_transpose_function, functions=[F.conv_transpose3d], lowering={
    aten.conv_transpose3d.input: (F.conv_transpose3d, ("input", "weight", "bias", "stride",
                                                       "padding", "output_padding", "groups",
                                                       "dilation"))})
reg(pool.max_pool_module, modules=[nn.MaxPool3d])
reg(pool.avg_pool_module, modules=[nn.AvgPool3d])
reg(pool.max_pool_function, functions=[F.max_pool3d, torch.max_pool3d], lowering={
    aten.max_pool3d.default: (F.max_pool3d, ("self", "kernel_size", "stride", "padding",
                                             "dilation", "ceil_mode"))})
reg(pool.avg_pool_function, functions=[F.avg_pool3d], lowering={
    aten.avg_pool3d.default: (F.avg_pool3d, ("self", "kernel_size", "stride", "padding",
                                             "ceil_mode", "count_include_pad",
                                             "divisor_override"))})
reg(resample.upsample_module, modules=[nn.Upsample])
reg(resample.interpolate_function, functions=[F.interpolate, F.upsample], lowering={
    aten.upsample_trilinear3d.vec: (F.interpolate, INTERPOLATE + (Const("trilinear"),
                                                                  "align_corners")),
    aten.upsample_nearest3d.vec: (F.interpolate, INTERPOLATE + (Const("nearest"),)),
    aten._upsample_nearest_exact3d.vec: (F.interpolate, INTERPOLATE + (Const("nearest-exact"),))})
reg(pad.constant_pad_module, modules=[nn.ConstantPad3d, nn.ZeroPad3d])
reg(pad.reflection_pad_module, modules=[nn.ReflectionPad3d])
reg(pad.replication_pad_module, modules=[nn.ReplicationPad3d])
reg(pad.circular_pad_module, modules=[nn.CircularPad3d])
reg(pad.pad_function, functions=[F.pad], lowering={
    aten.pad.default: (F.pad, ("self", "pad", "mode", "value")),
    aten.constant_pad_nd.default: (F.pad, ("self", "pad", Const("constant"), "value"))})
reg(pad.crop, functions=[aten.slice.Tensor])
reg(flip.flip, functions=[torch.flip, aten.flip.default], methods=["flip"])

# normalization: whole-volume statistics (barriers), or running statistics per voxel
reg(norm.instance_norm_module, modules=[nn.InstanceNorm3d])
reg(norm.instance_norm_function, functions=[F.instance_norm], lowering={
    aten.instance_norm.default: (F.instance_norm, NORM + ("use_input_stats", "momentum",
                                                          "eps"))})
reg(norm.group_norm_module, modules=[nn.GroupNorm])
reg(norm.group_norm_function, functions=[F.group_norm], lowering={
    aten.group_norm.default: (F.group_norm, ("input", "num_groups", "weight", "bias", "eps"))})
reg(norm.batch_norm_module, modules=[nn.BatchNorm3d, nn.BatchNorm2d, nn.BatchNorm1d])
reg(norm.batch_norm_function, functions=[F.batch_norm], lowering={
    aten.batch_norm.default: (F.batch_norm, NORM + ("training", "momentum", "eps"))})
reg(reduce.adaptive_avg_pool_module, modules=[nn.AdaptiveAvgPool3d])
reg(reduce.adaptive_avg_pool_function, functions=[F.adaptive_avg_pool3d], lowering={
    aten.adaptive_avg_pool3d.default: (F.adaptive_avg_pool3d, ("self", "output_size"))})
reg(reduce.mean, functions=[torch.mean], methods=["mean"],
    lowering={aten.mean.dim: (torch.mean, ("self", "dim", "keepdim"))})

# per voxel
reg(dropout.dropout_module, modules=[nn.Dropout], per_voxel=True)
reg(dropout.dropout_module, modules=[nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout])
reg(dropout.dropout_function, functions=[F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                         F.alpha_dropout], lowering={
    aten.dropout.default: (F.dropout, DROP), aten.feature_dropout.default: (F.dropout3d, DROP),
    aten.alpha_dropout.default: (F.alpha_dropout, DROP)})
reg(channels.cat, functions=[torch.cat, torch.concat, torch.concatenate],
    lowering={aten.cat.default: (torch.cat, ("tensors", "dim"))})
reg(channels.softmax_function, functions=[torch.softmax, F.softmax, torch.log_softmax,
                                          F.log_softmax], methods=["softmax", "log_softmax"],
    lowering={aten.softmax.int: (torch.softmax, ("self", "dim")),
              aten._softmax.default: (torch.softmax, ("self", "dim")),
              aten.log_softmax.int: (torch.log_softmax, ("self", "dim")),
              aten._log_softmax.default: (torch.log_softmax, ("self", "dim"))})
reg(channels.softmax_module, modules=[nn.Softmax, nn.LogSoftmax])
reg(channels.softmin_module, modules=[nn.Softmin])
reg(channels.repeat_function, functions=[aten.repeat.default])
reg(channels.repeat_method, methods=["repeat"])
reg(channels.channels_last_block, modules=[channels.ChannelsLastBlock])
reg(pointwise.relu, modules=pointwise.RELU_MODULES, functions=pointwise.RELU_FUNCTIONS,
    methods=pointwise.RELU_METHODS, per_voxel=True)
reg(pointwise.elementwise, modules=pointwise.ACTIVATION_MODULES,
    functions=pointwise.FUNCTIONS, methods=pointwise.METHODS, per_voxel=True)
# one weight per channel: along dim 1, which is z with channels last
reg(pointwise.elementwise, modules=[nn.PReLU], functions=[F.prelu],
    lowering={aten.prelu.default: (F.prelu, ("self", "weight"))})
reg(pointwise.increasing, modules=pointwise.INCREASING_MODULES,
    functions=pointwise.INCREASING_FUNCTIONS, methods=pointwise.INCREASING_METHODS,
    per_voxel=True)
reg(pointwise.identity, functions=pointwise.ATEN_COPIES, per_voxel=True)
reg(pointwise.cast, functions=pointwise.ATEN_CASTS, per_voxel=True)
reg(pointwise.elementwise, rule=pointwise.is_aten_pointwise, per_voxel=True)

# along the last axis: per voxel with channels last only, so no tile kernel of their own
reg(None, modules=[nn.LayerNorm, nn.Linear], functions=[F.layer_norm, F.linear],
    per_voxel=True, lowering={
        aten.layer_norm.default: (F.layer_norm, ("input", "normalized_shape", "weight",
                                                 "bias", "eps")),
        aten.linear.default: (F.linear, ("input", "weight", "bias"))})
# channels moved last and back: what a channels-last block starts and ends with
reg(None, lowering={aten.permute.default: (torch.permute, ("self", "dims"))})
