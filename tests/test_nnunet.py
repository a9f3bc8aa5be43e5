"""nnU-Net v2 model folders against nnunetv2's own predictor.

Each test builds a trained-folder layout in a temporary folder (plans.json,
dataset.json, fold_N/checkpoint_final.pth in the format nnU-Net's trainer saves, random
weights; the segmentation head scaled by 10 so that class margins are of the order a
trained network gives, median ~1.7 instead of ~0.17) and compares volarray with
``nnUNetPredictor`` on the same volume: with nnU-Net's float16 accumulator patched to
float32 the logits agree within 1e-5; unmodified, the argmax labels agree on >= 99.9% of
the voxels (nnU-Net's float16 gaussian underflows near the image's corners, where its
logits are rounded to whole numbers)."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import torch

nnunetv2 = pytest.importorskip("nnunetv2")

import volarray  # noqa: E402
from volarray.nnunet import load_nnunet, predict_nnunet  # noqa: E402

from conftest import random_volume  # noqa: E402

ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2],
        "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
PROPS = {"max": 900.0, "mean": 100.0, "median": 90.0, "min": -800.0,
         "percentile_00_5": -50.0, "percentile_99_5": 300.0, "std": 80.0}


def make_folder(root: Path, *, labels=None, regions_class_order=None,
                schemes=("ZScoreNormalization",), use_mask=None, transpose=(0, 1, 2),
                mirror_axes=(0, 1, 2), folds=(0, 1), patch=(16, 24, 20), seed=0,
                head_scale=10.0) -> Path:
    """A trained nnU-Net v2 model folder (3d_fullres, PlainConvUNet of 3 stages) with
    random weights, laid out and saved as nnU-Net's trainer does (``mirror_axes=None``:
    trained without mirroring)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    root.mkdir(parents=True, exist_ok=True)
    labels = labels or {"background": 0, "liver": 1, "tumour": 2}
    dataset = {"channel_names": {str(i): s.replace("Normalization", "")
                                 for i, s in enumerate(schemes)},
               "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
    if regions_class_order:
        dataset["regions_class_order"] = regions_class_order
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    plans = {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [40, 48, 32],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose),
        "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch), "median_image_size_in_voxels": [40, 48, 32],
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": list(schemes),
            "use_mask_for_norm": list(use_mask or [False] * len(schemes)),
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling,
            "resampling_fn_seg_kwargs": dict(resampling, is_seg=True, order=1),
            "resampling_fn_probabilities_kwargs": dict(resampling, order=1),
            "architecture": ARCH, "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(i): PROPS
                                                        for i in range(len(schemes))}}
    (root / "plans.json").write_text(json.dumps(plans, indent=2))
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    heads = PlansManager(plans).get_label_manager(dataset).num_segmentation_heads
    for k, fold in enumerate(folds):
        torch.manual_seed(seed + k)
        net = get_network_from_plans(ARCH["network_class_name"], ARCH["arch_kwargs"],
                                     ARCH["_kw_requires_import"], len(schemes), heads,
                                     allow_init=True, deep_supervision=True)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith("decoder.seg_layers"):
                    p.mul_(head_scale)
        checkpoint = {  # nnUNetTrainer.save_checkpoint's keys
            "network_weights": net.state_dict(),
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                        "train_losses": [np.float32(0.3)], "lrs": [0.01]},
            "_best_ema": np.float64(0.5), "current_epoch": 1000,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                          "dataset_json": dataset, "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": mirror_axes}
        (root / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, root / f"fold_{fold}" / "checkpoint_final.pth")
    return root


def nnunet_predictor(folder, folds, mirror=True):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    with contextlib.redirect_stdout(io.StringIO()):  # it prints about CPU devices
        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                            device=torch.device("cpu"), allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(folder), folds, "checkpoint_final.pth")
    return p


def nnunet_logits(predictor, data: np.ndarray, float32: bool) -> np.ndarray:
    """nnU-Net's logits of a preprocessed (C, Z, Y, X) array; ``float32``: with the
    accumulator it allocates in float16 (torch.zeros(..., dtype=torch.half) in
    _internal_predict_sliding_window_return_logits) allocated in float32."""
    with float32_accumulator(float32):
        y = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    assert y.dtype == (torch.float32 if float32 else torch.float16)
    return y.float().numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("nnunet") / "Dataset999_Tiny")


@pytest.fixture(scope="module")
def parity(folder):
    """volarray's and nnU-Net's logits (float32 and unmodified) on a non-cubic volume
    that is no multiple of the patch, two folds, mirroring on all three axes."""
    vol = random_volume((1, 37, 45, 29), seed=4)
    model = load_nnunet(folder, folds=(0, 1))
    kw = dict(normalize=False, chunks=(13, 17, 11))
    ours = {out: predict_nnunet(model, vol, output=out, **kw) for out in ("logits",
                                                                         "probabilities")}
    ours["labels"] = predict_nnunet(model, vol, output="labels", **kw)
    assert all(isinstance(y, da.Array) for y in ours.values())  # lazy
    # one graph: the windows are computed once for the three outputs
    ours = dict(zip(ours, dask.compute(*ours.values(), scheduler="threads")))
    p = nnunet_predictor(folder, (0, 1))
    return vol, ours, nnunet_logits(p, vol, True), nnunet_logits(p, vol, False)


def test_logits_equal_nnunet_with_float32_accumulator(parity):
    vol, ours, ref32, _ = parity
    ours = ours["logits"]
    assert ours.shape == ref32.shape == (3, 37, 45, 29)
    assert np.abs(ours - ref32).max() <= 1e-5


def test_labels_agree_with_unmodified_nnunet(parity):
    vol, ours, _, ref16 = parity
    ours = ours["logits"]
    agree = (ours.argmax(0) == ref16.argmax(0)).mean()
    assert agree >= 0.999, agree
    # 4 voxels away from the faces the differences are float16 rounding only
    assert np.abs(ours - ref16)[:, 4:-4, 4:-4, 4:-4].max() <= 4e-3 * np.abs(ref16).max()


def test_volume_smaller_than_the_patch(folder):
    """Padded with zeros to the patch as pad_nd_image does, cropped back."""
    vol = random_volume((1, 12, 30, 15), seed=5)
    ours = predict_nnunet(folder, vol, folds=(0,), output="logits", normalize=False)
    ref = nnunet_logits(nnunet_predictor(folder, (0,)), vol, True)
    assert ours.shape == ref.shape
    assert np.abs(ours.compute() - ref).max() <= 1e-5


def test_probabilities_and_labels(parity):
    vol, ours, ref32, _ = parity
    ref = torch.softmax(torch.from_numpy(ref32), 0).numpy()
    assert np.abs(ours["probabilities"] - ref).max() <= 1e-5
    labels = ours["labels"]
    assert labels.dtype == np.uint8 and labels.shape == (37, 45, 29)
    assert (labels == ours["logits"].argmax(0)).all()
    assert (labels == ref32.argmax(0)).mean() >= 0.9999


def test_regions_and_transpose(tmp_path):
    """Region-based labels (sigmoid, regions_class_order) and a transpose_forward, as
    nnU-Net's label manager converts them."""
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    folder = make_folder(tmp_path / "regions", labels=labels, regions_class_order=[1, 2],
                         transpose=(2, 0, 1), mirror_axes=(0, 1), folds=(0,),
                         patch=(16, 16, 24))
    model = load_nnunet(folder)
    assert model.label_manager.has_regions and model.heads == 2
    vol = random_volume((1, 26, 20, 33), seed=6)  # nnU-Net sees it as (33, 26, 20)
    p = nnunet_predictor(folder, (0,))
    ref = nnunet_logits(p, vol.transpose(0, 3, 1, 2), True).transpose(0, 2, 3, 1)
    lm = p.label_manager
    probs = predict_nnunet(model, vol, normalize=False).compute()
    assert np.abs(probs - torch.sigmoid(torch.from_numpy(ref)).numpy()).max() <= 1e-5
    seg = predict_nnunet(model, vol, output="labels", normalize=False).compute()
    expected = lm.convert_logits_to_segmentation(ref)
    assert set(np.unique(seg)) <= {0, 1, 2}
    assert (seg == expected).mean() >= 0.999


def test_normalization_and_crop_as_nnunet_preprocesses(tmp_path):
    """CT and z-score normalization with whole-image statistics (against numpy and
    nnU-Net's own classes), nnU-Net's crop to the nonzero box, and the prediction put
    back with background outside it."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization, ZScoreNormalization)
    folder = make_folder(tmp_path / "ct_mr", schemes=("CTNormalization", "ZScoreNormalization"),
                         mirror_axes=None, folds=(0,))
    rng = np.random.default_rng(7)
    vol = np.zeros((2, 30, 41, 27), np.float32)
    vol[0, 3:28, 5:40, 2:25] = rng.normal(60, 150, (25, 35, 23))  # CT-like, zero border
    vol[1, 3:28, 5:40, 2:25] = rng.normal(300, 40, (25, 35, 23))
    model = load_nnunet(folder)

    # normalization alone, whole volume, no crop: numpy's formulas
    normed = model.normalize(da.from_array(vol, chunks=(2, 8, 16, 9)))
    ct = (np.clip(vol[0], -50.0, 300.0) - 100.0) / 80.0
    z = (vol[1] - vol[1].astype(np.float64).mean()) / vol[1].astype(np.float64).std()
    out = normed.compute()
    assert np.abs(out[0] - ct).max() <= 1e-5 and np.abs(out[1] - z).max() <= 1e-5

    # the pipeline: crop, normalize (nnU-Net's classes), predict, uncrop
    data, seg, bbox = crop_to_nonzero(vol.copy())
    assert [tuple(b) for b in bbox] == [(3, 28), (5, 40), (2, 25)]
    data[0] = CTNormalization(False, PROPS).run(data[0], seg[0])
    data[1] = ZScoreNormalization(False, PROPS).run(data[1], seg[0])
    crop = vol[(slice(None),) + tuple(slice(a, b) for a, b in bbox)]
    ours = model.normalize(da.from_array(crop, chunks=(2, 9, 20, 12))).compute()
    assert (ours[0] == data[0]).all()  # CT: the same float32 operations
    assert np.abs(ours[1] - data[1]).max() <= 2e-6  # z-score: float64 vs float32 statistics
    logits = nnunet_logits(nnunet_predictor(folder, (0,)), data, True)
    probs = predict_nnunet(model, vol, chunks=(16, 16, 16)).compute()
    inside = (slice(None),) + tuple(slice(a, b) for a, b in bbox)
    # the z-score's 1e-6 reaches the probabilities as ~2e-5
    assert np.abs(probs[inside] - torch.softmax(torch.from_numpy(logits), 0).numpy()).max() <= 1e-4
    outside = np.ones(vol.shape[1:], bool)
    outside[inside[1:]] = False
    assert (probs[0][outside] == 1).all() and (probs[1:, outside] == 0).all()
    labels = predict_nnunet(model, vol, output="labels").compute()
    assert (labels[inside[1:]] == logits.argmax(0)).all() and (labels[outside] == 0).all()


def test_other_normalizations(tmp_path):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        NoNormalization, RescaleTo01Normalization, RGBTo01Normalization)
    schemes = (RescaleTo01Normalization, RGBTo01Normalization, NoNormalization)
    folder = make_folder(tmp_path / "other", schemes=[c.__name__ for c in schemes], folds=(0,))
    vol = np.abs(random_volume((3, 14, 19, 11), seed=9, scale=60)).astype(np.float32)
    ours = load_nnunet(folder).normalize(da.from_array(vol, chunks=(3, 5, 7, 11))).compute()
    for c, cls in enumerate(schemes):
        assert (ours[c] == cls(False, PROPS).run(vol[c].copy())).all(), cls.__name__
    with pytest.raises(volarray.InputError, match="RGBTo01Normalization but holds values"):
        load_nnunet(folder).normalize(da.from_array(vol * 10))


def test_channels_split_across_chunks(tmp_path):
    """A CT + PET volume whose channel axis is split across chunks (``da.stack`` of two
    volumes, a zarr chunked (1, 16, 16, 16)): each chunk normalizes its own channels
    with their own scheme, and the prediction equals the one-channel-chunk one."""
    import zarr
    folder = make_folder(tmp_path / "ct_pet", schemes=("CTNormalization", "ZScoreNormalization"),
                         mirror_axes=None, folds=(0,))
    rng = np.random.default_rng(11)
    ct = rng.normal(60, 150, (20, 26, 18)).astype(np.float32)
    pet = rng.normal(300, 40, (20, 26, 18)).astype(np.float32)
    vol = np.stack([ct, pet])
    model = load_nnunet(folder)
    normed = model.normalize(da.from_array(vol, chunks=(2, 16, 16, 16))).compute()
    split = model.normalize(da.from_array(vol, chunks=(1, 16, 16, 16))).compute()
    assert (split == normed).all()
    one = predict_nnunet(model, da.from_array(vol, chunks=(2, 16, 16, 16)),
                         output="logits").compute()
    z = zarr.create_array(str(tmp_path / "case.zarr"), shape=vol.shape, chunks=(1, 16, 16, 16),
                          dtype="f4")
    z[...] = vol
    for volume in (da.stack([da.from_array(ct, chunks=16), da.from_array(pet, chunks=16)]),
                   zarr.open_array(str(tmp_path / "case.zarr"), mode="r")):
        got = predict_nnunet(model, volume, output="logits").compute()
        assert (got == one).all()


def test_refusals(tmp_path, folder):
    vol = random_volume((20, 24, 20))
    with pytest.raises(volarray.InputError, match=r"fold_3.*folds with checkpoint_final.pth "
                                                  r"are \(0, 1\): pass folds=\(0, 1\)"):
        load_nnunet(folder, folds=(3,))
    with pytest.raises(volarray.InputError, match="configuration='3d_lowres'"):
        load_nnunet(folder, configuration="3d_lowres")
    with pytest.raises(volarray.InputError, match="output='segmentation'"):
        predict_nnunet(folder, vol, output="segmentation")
    with pytest.raises(volarray.InputError, match="2 channel.*takes 1"):
        predict_nnunet(folder, np.stack([vol, vol]))
    with pytest.raises(volarray.InputError, match="NaN at channel 0, voxel .* = \\(1, 2, 3\\)"):
        bad = vol.copy()
        bad[1, 2, 3] = np.nan
        predict_nnunet(folder, bad).compute()
    masked = make_folder(tmp_path / "masked", use_mask=[True], folds=(0,))
    with pytest.raises(volarray.InputError, match="use_mask_for_norm.*normalize=False"):
        predict_nnunet(masked, vol)
    assert predict_nnunet(masked, vol, normalize=False).shape == (3, 20, 24, 20)
    # a checkpoint holding an arbitrary object is not unpickled unless trusted
    ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    ck["init_args"]["stranger"] = Path("x")
    (tmp_path / "untrusted" / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (tmp_path / "untrusted" / name).write_text((folder / name).read_text())
    torch.save(ck, tmp_path / "untrusted" / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(volarray.InputError, match="trust_checkpoint=True"):
        load_nnunet(tmp_path / "untrusted")
    assert load_nnunet(tmp_path / "untrusted", trust_checkpoint=True).folds == (0,)


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "volarray.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # nnU-Net parity is tested through the API
def test_cli_writes_labels(tmp_path, folder):
    """An int16 volume in a zarr group, labels out, the safe writer's rules."""
    import zarr
    vol = (random_volume((27, 33, 22), seed=8) * 100 + 40).astype(np.int16)
    zarr.open_group(str(tmp_path / "case.zarr"), mode="w").create_array(
        "image", data=vol, chunks=(16, 16, 16))
    args = ("predict", "case.zarr", "seg.zarr", "--nnunet", folder, "--folds", "0", "1",
            "--output", "labels", "--chunks", "16", "--no-mirror", "--quiet")
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = zarr.open_group(str(tmp_path / "seg.zarr"), mode="r")["prediction"]
    assert out.dtype == np.uint8 and out.shape == vol.shape and out.chunks == (16, 16, 16)
    expected = predict_nnunet(folder, vol, folds=(0, 1), output="labels", mirror=False)
    assert (out[...] == expected.compute()).all()
    assert out.attrs["method"] == "nnunet"


def test_cli_refusals(tmp_path, folder, capsys, monkeypatch):
    """In process, through the command line's main: one line, exit 2, nothing written."""
    from volarray.cli import main
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "case.npy", random_volume((20, 24, 20)))
    (tmp_path / "seg.zarr").mkdir()
    cases = [(["seg.zarr", "--nnunet", folder], "is a folder that volarray did not write"),
             (["new.zarr", "--nnunet", folder, "--tta", "flips"], "--tta: not for --nnunet"),
             (["new.zarr", "--model", "x:y", "--folds", "1"], "--folds: only for --nnunet"),
             (["new.zarr", "--nnunet", folder, "--folds", "4"],
              ("volarray: error: --folds: '", "pass --folds 0 1 or some")),
             (["new.zarr", "--model", "x:y", "--output", "logits"], "--output logits applies")]
    for argv, needle in cases:
        assert main(["predict", "case.npy", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        needles = needle if isinstance(needle, tuple) else (needle,)
        assert all(n in err for n in needles) and "Traceback" not in err, err
    assert not (tmp_path / "new.zarr").exists() and not any((tmp_path / "seg.zarr").iterdir())


# -- raw scans: resampled to the plans' spacing and back, as nnU-Net's predictor does ----

RAW_SPACING = (2.5, 0.8, 0.8)  # the plans say (1, 1, 1): the grid becomes (40, 32, 32)


def raw_scan_volume() -> np.ndarray:
    """A 16x40x40 scan with an air border (nnU-Net crops it away before resampling)."""
    vol = np.zeros((1, 16, 40, 40), np.float32)
    vol[0, 1:15, 3:38, 2:39] = np.random.default_rng(3).normal(100, 80, (14, 35, 37))
    return vol


@contextlib.contextmanager
def float32_accumulator(on: bool = True):
    """nnU-Net's logits accumulated in float32 instead of float16 (the torch.zeros(...,
    dtype=torch.half) of its sliding window made float32)."""
    zeros = torch.zeros

    def zeros32(*a, **k):
        if k.get("dtype") is torch.half:
            k["dtype"] = torch.float32
        return zeros(*a, **k)

    torch.zeros = zeros32 if on else zeros
    try:
        yield
    finally:
        torch.zeros = zeros


def nnunet_raw(folder, vol, spacing, float32: bool):
    """nnUNetPredictor.predict_single_npy_array on the raw scan: (labels, probabilities)."""
    p = nnunet_predictor(folder, (0,), mirror=False)
    with float32_accumulator(float32):
        return p.predict_single_npy_array(vol.copy(), {"spacing": list(spacing)}, None, None,
                                          True)


def test_raw_scan_resampled_as_nnunet(folder):
    """A scan at (2.5, 0.8, 0.8) through a model planned at (1, 1, 1): nnU-Net crops,
    normalizes, resamples (order 3 in the plane, the anisotropic axis alone with order
    0), predicts, resamples the logits back (order 1) and takes softmax and argmax.
    volarray does it lazily and agrees within 1e-3 (measured: ~1e-6) with nnU-Net's
    float32 sums, and on >= 99.9% of the labels with nnU-Net as it is."""
    vol = raw_scan_volume()
    model = load_nnunet(folder, folds=(0,))
    kw = dict(spacing=RAW_SPACING, mirror=False, chunks=(7, 13, 17))
    ours = [predict_nnunet(model, vol, output=out, **kw) for out in ("probabilities", "labels")]
    assert ours[0].shape == (3, 16, 40, 40) and ours[1].shape == (16, 40, 40)
    assert ours[0].chunks[1:] == ((7, 7, 2), (13, 13, 13, 1), (17, 17, 6))
    probs, labels = dask.compute(*ours)
    _, ref32 = nnunet_raw(folder, vol, RAW_SPACING, True)
    assert np.abs(probs - ref32).max() <= 1e-3
    seg16, _ = nnunet_raw(folder, vol, RAW_SPACING, False)
    assert (labels == seg16).mean() >= 0.999
    assert (labels == probs.argmax(0)).all()
    # at the plans' own spacing nothing is resampled: the very graph of spacing=None
    same = predict_nnunet(model, vol, spacing=(1, 1, 1), mirror=False)
    assert same.name == predict_nnunet(model, vol, mirror=False).name != ours[0].name


def write_scan(path, vol_kji, spacing_kji):
    """A NIfTI file of a (k, j, i) array as nnU-Net's readers give it: voxels (i, j, k)."""
    import nibabel as nib
    affine = np.diag(list(spacing_kji[::-1]) + [1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol_kji.transpose(2, 1, 0)), affine),
             str(path))
    return path


def nnunet_on_file(folder, path):
    """nnU-Net's labels of a NIfTI file read with the plans' SimpleITKIO, back in the
    file's (i, j, k) order."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    data, props = SimpleITKIO().read_images([str(path)])
    p = nnunet_predictor(folder, (0,), mirror=False)
    return p.predict_single_npy_array(data, props, None, None, False).transpose(2, 1, 0)


def test_nifti_scan_through_the_command_line(tmp_path, folder, capsys, monkeypatch):
    """``volarray predict scan.nii.gz seg.nii.gz --nnunet FOLDER`` (in process): the
    header's voxel size and axes as nnU-Net's SimpleITKIO reads them, the scan
    resampled and the labels written back on its own grid."""
    import nibabel as nib
    from volarray.cli import main
    pytest.importorskip("nibabel")
    pytest.importorskip("SimpleITK")
    monkeypatch.chdir(tmp_path)
    write_scan(tmp_path / "scan.nii.gz", raw_scan_volume()[0], RAW_SPACING)
    code = main(["predict", "scan.nii.gz", "seg.nii.gz", "--nnunet", str(folder), "--folds",
                 "0", "--no-mirror", "--output", "labels", "--quiet"])
    assert code == 0, capsys.readouterr().err
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    assert seg.shape == (40, 40, 16) and np.allclose(seg.header.get_zooms(), (0.8, 0.8, 2.5))
    assert (np.asarray(seg.dataobj) == nnunet_on_file(folder, tmp_path / "scan.nii.gz")).mean() \
        >= 0.999


@pytest.mark.slow  # a subprocess: imports torch and nnunetv2 again (~10 s)
def test_nifti_scan_cli_subprocess(tmp_path, folder):
    import nibabel as nib
    write_scan(tmp_path / "scan.nii.gz", raw_scan_volume()[0], RAW_SPACING)
    r = run("predict", "scan.nii.gz", "seg.nii.gz", "--nnunet", folder, "--folds", "0",
            "--no-mirror", "--output", "labels", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    seg = np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj)
    assert (seg == nnunet_on_file(folder, tmp_path / "scan.nii.gz")).mean() >= 0.999
    # the API on the path and on open_nifti's DataArray: the same labels
    ours = predict_nnunet(folder, str(tmp_path / "scan.nii.gz"), output="labels", mirror=False)
    assert (ours.compute() == seg).all()
    from volarray.formats.nifti import open_nifti
    scan = open_nifti(tmp_path / "scan.nii.gz")
    assert (predict_nnunet(folder, scan, output="labels", mirror=False).compute() == seg).all()
