"""Networks nobody here wrote: MONAI's fully convolutional 3-D nets and nnU-Net's
(dynamic-network-architectures), random weights, a non-cubic volume with uneven
chunks. Each is exact (within 2e-5 x max(1, max |y|) of its own whole-volume forward)
or refused with a message naming the construct at fault: never wrong."""
import numpy as np
import pytest
import torch

import volarray
from volarray.modelcall import pick_output

nets = pytest.importorskip("monai.networks.nets")


def _monai():
    return {
        "UNet": (lambda: nets.UNet(3, 1, 2, (8, 16, 32), (2, 2), num_res_units=1,
                                   norm="instance"), (32, 48, 40)),
        "SegResNet": (lambda: nets.SegResNet(3, 8, 1, 2), (32, 48, 40)),
        "DynUNet": (lambda: nets.DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2],
                                         filters=[8, 16, 32]), (32, 48, 40)),
        "AttentionUnet": (lambda: nets.AttentionUnet(3, 1, 2, (8, 16, 32), (2, 2)), (32, 48, 40)),
        "VNet": (lambda: nets.VNet(3, 1, 2), (32, 48, 32)),
        # isinstance() guards, torch.as_tensor of shapes, tuples unpacked, static-shape
        # padding: captured by torch.export as the real forward runs them
        "BasicUNet": (lambda: nets.BasicUNet(3, 1, 2, features=(8, 8, 16, 16, 32, 8)),
                      (32, 48, 40)),
        "HighResNet": (lambda: nets.HighResNet(3, 1, 2), (20, 28, 24)),
        "SegResNetDS": (lambda: nets.SegResNetDS(3, 8, 1, 2, blocks_down=(1, 1, 1)),
                        (32, 48, 40)),
        "FlexibleUNet": (lambda: nets.FlexibleUNet(1, 2, "efficientnet-b0", pretrained=False,
                                                   spatial_dims=3), (32, 48, 40)),
    }


def _nnunet():
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    kw = dict(input_channels=1, n_stages=3, features_per_stage=(8, 16, 32),
              conv_op=torch.nn.Conv3d, kernel_sizes=3, strides=(1, 2, 2), num_classes=2,
              norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
              nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
              n_conv_per_stage_decoder=2)
    return {
        "PlainConvUNet": lambda ds: unet.PlainConvUNet(**kw, n_conv_per_stage=2,
                                                       deep_supervision=ds),
        "ResidualEncoderUNet": lambda ds: unet.ResidualEncoderUNet(**kw, n_blocks_per_stage=2,
                                                                   deep_supervision=ds),
    }


def check_exact(model, shape, scheduler="threads", client=None):
    vol = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    chunks = tuple(s // 2 + 3 for s in shape)  # uneven
    y = volarray.predict(model, vol, chunks=chunks)
    y = client.compute(y).result() if client is not None else y.compute(scheduler=scheduler)
    with torch.inference_mode():
        ref = pick_output(model(torch.from_numpy(vol)[None, None]))[0].numpy()
    diff = float(np.abs(y - ref).max())
    assert diff <= 2e-5 * max(1.0, float(np.abs(ref).max())), diff


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "FlexibleUNet"
                                  else n for n in _monai()])  # FlexibleUNet: 14 s, -m slow
def test_monai_nets_exact(name):
    make, shape = _monai()[name]
    torch.manual_seed(0)
    check_exact(make().eval(), shape)


@pytest.mark.parametrize("name", ["PlainConvUNet", "ResidualEncoderUNet"])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_nnunet_nets_exact(name, deep_supervision):
    torch.manual_seed(0)
    check_exact(_nnunet()[name](deep_supervision).eval(), (32, 48, 40))


def test_on_a_local_cluster(local_cluster):
    torch.manual_seed(0)
    check_exact(_monai()["DynUNet"][0]().eval(), (32, 48, 40), client=local_cluster)
    for name in ("BasicUNet",):  # ATen ops in tile tasks, pickled (every net: -m slow)
        make, shape = _monai()[name]
        torch.manual_seed(0)
        check_exact(make().eval(), shape, client=local_cluster)


@pytest.mark.slow
# the model's weights are one key of the graph (VNet's are 170 MB): dask says so
@pytest.mark.filterwarnings("ignore:Sending large graph")
@pytest.mark.parametrize("name", list(_monai()) + ["PlainConvUNet", "ResidualEncoderUNet"])
def test_every_net_on_a_local_cluster(local_cluster, name):
    """The done-when of the models issue, in full: every net on 2 worker processes
    (the default run covers four of them there)."""
    torch.manual_seed(0)
    if name in _monai():
        make, shape = _monai()[name]
        check_exact(make().eval(), shape, client=local_cluster)
    else:
        for ds in (False, True):
            torch.manual_seed(0)
            check_exact(_nnunet()[name](ds).eval(), (32, 48, 40), client=local_cluster)


@pytest.mark.parametrize("make", [
    lambda: nets.UNETR(1, 2, (32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96,
                       num_heads=4),
    pytest.param(lambda: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12),
                 marks=pytest.mark.slow),  # as UNETR's, 12 s: in -m slow
])
def test_transformers_are_refused_naming_window_mode(make):
    """Global attention: every voxel depends on the whole volume; exact mode says so and
    names window mode, where these nets equal MONAI's sliding_window_inference."""
    torch.manual_seed(0)
    vol = np.random.default_rng(0).standard_normal((64, 64, 64)).astype(np.float32)
    with pytest.raises(volarray.UnsupportedOpError,
                       match=r"(?s)transformer's global attention.*method='window'"):
        volarray.predict(make().eval(), vol)
