"""Networks nobody here wrote, in exact mode: MONAI's 3-D segmentation nets and
nnU-Net's (dynamic-network-architectures, when installed), random weights, a
non-cubic volume with uneven chunks, against their own whole-volume forward.

Prints a markdown table: max abs difference and the tolerance 2e-5 x max(1, max |y|),
or the one-line refusal (a refusal is fine; a wrong answer is not).

    python benchmarks/bench_field_models.py
"""
from __future__ import annotations

import time

import numpy as np
import torch

import volarray
from volarray.modelcall import pick_output


def monai_nets():
    from monai.networks import nets
    yield "UNet", lambda: nets.UNet(3, 1, 2, (8, 16, 32), (2, 2), num_res_units=1,
                                    norm="instance"), (32, 48, 40)
    yield "BasicUNet", lambda: nets.BasicUNet(3, 1, 2, features=(8, 8, 16, 16, 32, 8)), (32, 48, 32)
    yield "SegResNet", lambda: nets.SegResNet(3, 8, 1, 2), (32, 48, 40)
    yield "SegResNetDS", lambda: nets.SegResNetDS(3, 8, 1, 2, blocks_down=(1, 1, 1)), (32, 48, 40)
    yield "DynUNet", lambda: nets.DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2],
                                          filters=[8, 16, 32]), (32, 48, 40)
    yield "AttentionUnet", lambda: nets.AttentionUnet(3, 1, 2, (8, 16, 32), (2, 2)), (32, 48, 40)
    yield "VNet", lambda: nets.VNet(3, 1, 2), (32, 48, 32)
    yield "HighResNet", lambda: nets.HighResNet(3, 1, 2), (24, 32, 28)
    yield "FlexibleUNet", lambda: nets.FlexibleUNet(1, 2, "efficientnet-b0", pretrained=False,
                                                    spatial_dims=3), (32, 64, 32)
    # global attention: refused in exact mode, naming method="window"
    yield "UNETR", lambda: nets.UNETR(1, 2, (32, 32, 32), feature_size=8, hidden_size=48,
                                      mlp_dim=96, num_heads=4), (32, 32, 32)
    yield "SwinUNETR", lambda: nets.SwinUNETR(in_channels=1, out_channels=2,
                                              feature_size=12), (64, 64, 64)


def nnunet_nets():
    try:
        from dynamic_network_architectures.architectures.unet import (PlainConvUNet,
                                                                      ResidualEncoderUNet)
    except ImportError:
        return
    kw = dict(input_channels=1, n_stages=3, features_per_stage=(8, 16, 32),
              conv_op=torch.nn.Conv3d, kernel_sizes=3, strides=(1, 2, 2),
              num_classes=2, norm_op=torch.nn.InstanceNorm3d,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
              nonlin_kwargs={"inplace": True})
    for ds in (False, True):
        yield f"PlainConvUNet (ds={ds})", lambda ds=ds: PlainConvUNet(
            **kw, n_conv_per_stage=2, n_conv_per_stage_decoder=2, deep_supervision=ds), (32, 48, 40)
        yield f"ResidualEncoderUNet (ds={ds})", lambda ds=ds: ResidualEncoderUNet(
            **kw, n_blocks_per_stage=2, n_conv_per_stage_decoder=2, deep_supervision=ds), (32, 48, 40)


def main():
    rows = ["| network | volume | chunks | result | max abs diff | tolerance | seconds |",
            "|---|---|---|---|---|---|---|"]
    for name, make, shape in list(monai_nets()) + list(nnunet_nets()):
        torch.manual_seed(0)
        try:
            model = make().eval()
        except Exception as e:  # a net this MONAI version lacks
            rows.append(f"| {name} | | | not built: {type(e).__name__} | | | |")
            continue
        vol = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        chunks = tuple(s // 2 + 3 for s in shape)  # uneven
        t0 = time.perf_counter()
        try:
            y = volarray.predict(model, vol, chunks=chunks).compute()
        except volarray.VolarrayError as e:
            msg = " ".join(str(e).split())[:150].replace("|", "/")
            rows.append(f"| {name} | {shape} | {chunks} | refused: {type(e).__name__}: {msg} "
                        "| | | |")
            continue
        with torch.inference_mode():
            ref = pick_output(model(torch.from_numpy(vol)[None, None]))[0]
        diff = float(np.abs(y - ref.numpy()).max())
        tol = 2e-5 * max(1.0, float(ref.abs().max()))
        verdict = "exact" if diff <= tol else "WRONG"
        rows.append(f"| {name} | {shape} | {chunks} | {verdict} | {diff:.1e} | {tol:.1e} | "
                    f"{time.perf_counter() - t0:.1f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
