"""Which builder places each op a capture can call: one registration per op.

Keys are what a captured node calls: module classes (the torch.fx capture), torch
functions and ATen ops (torch.export's capture, lowered by `volarray.capture`), tensor
method names. Adding an op: its kernel and builder in one module of `volarray.ops`,
and one line here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layout import ChannelsLastBlock
from . import channels, conv, dropout, flip, norm, pad, pointwise, pool, reduce, resample
from .registry import Registry

aten = torch.ops.aten
OPS = Registry()
reg = OPS.register

# convolutions, pooling, resampling, padding: local ops with a halo or a scale
reg(conv.conv_module, modules=[nn.Conv3d])
reg(conv.conv_function, functions=[F.conv3d, torch.conv3d])
reg(conv.conv_transpose_module, modules=[nn.ConvTranspose3d])
reg(conv.conv_transpose_function, functions=[F.conv_transpose3d])
reg(pool.max_pool_module, modules=[nn.MaxPool3d])
reg(pool.avg_pool_module, modules=[nn.AvgPool3d])
reg(pool.max_pool_function, functions=[F.max_pool3d, torch.max_pool3d])
reg(pool.avg_pool_function, functions=[F.avg_pool3d])
reg(resample.upsample_module, modules=[nn.Upsample])
reg(resample.interpolate_function, functions=[F.interpolate, F.upsample])
reg(pad.constant_pad_module, modules=[nn.ConstantPad3d, nn.ZeroPad3d])
reg(pad.reflection_pad_module, modules=[nn.ReflectionPad3d])
reg(pad.replication_pad_module, modules=[nn.ReplicationPad3d])
reg(pad.circular_pad_module, modules=[nn.CircularPad3d])
reg(pad.pad_function, functions=[F.pad])
reg(pad.crop, functions=[aten.slice.Tensor])
reg(flip.flip, functions=[torch.flip, aten.flip.default], methods=["flip"])

# normalization: whole-volume statistics (barriers), or running statistics per voxel
reg(norm.instance_norm_module, modules=[nn.InstanceNorm3d])
reg(norm.instance_norm_function, functions=[F.instance_norm])
reg(norm.group_norm_module, modules=[nn.GroupNorm])
reg(norm.group_norm_function, functions=[F.group_norm])
reg(norm.batch_norm_module, modules=[nn.BatchNorm3d, nn.BatchNorm2d, nn.BatchNorm1d])
reg(norm.batch_norm_function, functions=[F.batch_norm])
reg(reduce.adaptive_avg_pool_module, modules=[nn.AdaptiveAvgPool3d])
reg(reduce.adaptive_avg_pool_function, functions=[F.adaptive_avg_pool3d])
reg(reduce.mean, functions=[torch.mean], methods=["mean"])

# per voxel
reg(dropout.dropout_module, modules=[nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                     nn.AlphaDropout])
reg(dropout.dropout_function, functions=[F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                         F.alpha_dropout])
reg(channels.cat, functions=[torch.cat, torch.concat, torch.concatenate])
reg(channels.softmax_function, functions=[torch.softmax, F.softmax, torch.log_softmax,
                                          F.log_softmax], methods=["softmax", "log_softmax"])
reg(channels.softmax_module, modules=[nn.Softmax, nn.LogSoftmax])
reg(channels.softmin_module, modules=[nn.Softmin])
reg(channels.repeat_function, functions=[aten.repeat.default])
reg(channels.repeat_method, methods=["repeat"])
reg(channels.channels_last_block, modules=[ChannelsLastBlock])
reg(pointwise.relu, modules=pointwise.RELU_MODULES, functions=pointwise.RELU_FUNCTIONS,
    methods=pointwise.RELU_METHODS)
reg(pointwise.elementwise, modules=pointwise.ACTIVATION_MODULES,
    functions=pointwise.FUNCTIONS, methods=pointwise.METHODS)
reg(pointwise.increasing, modules=pointwise.INCREASING_MODULES,
    functions=pointwise.INCREASING_FUNCTIONS, methods=pointwise.INCREASING_METHODS)
reg(pointwise.identity, functions=pointwise.ATEN_COPIES)
reg(pointwise.cast, functions=pointwise.ATEN_CASTS)
reg(pointwise.elementwise, rule=pointwise.is_aten_pointwise)
