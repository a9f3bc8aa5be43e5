"""The composable pieces behind `predict`: predictors traced once, compositions with one
return type each, arguments of the other method refused, errors naming their parameter."""
import dataclasses

import numpy as np
import pytest
import torch

import volarray
import volarray.predictors
import volarray.window
from volarray.models import FaultSeg3D, MultiScaleNet, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume


@pytest.fixture
def traces(monkeypatch):
    """Counts the traces of the model (each one captures it and checks the capture
    against the model's own forward) and the hashes of its weights (window mode)."""
    counts = {"trace": 0, "weights": 0}
    trace, token = volarray.predictors.trace, volarray.window.weights_token

    def counted_trace(*a, **k):
        counts["trace"] += 1
        return trace(*a, **k)

    def counted_token(*a, **k):
        counts["weights"] += 1
        return token(*a, **k)
    monkeypatch.setattr(volarray.predictors, "trace", counted_trace)
    monkeypatch.setattr(volarray.window, "weights_token", counted_token)
    return counts


def mc_dropout():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Dropout3d(0.3), torch.nn.Conv3d(4, 2, 1)).eval()
    model[2].train()
    return model


@pytest.mark.parametrize("options", [
    {"tta": "flips"}, {"output": "argmax"}, {"output": "argmax", "tta": "flips"},
    {"threshold": 0.5, "tta": "flips"}, {"pad": "reflect", "tta": "flips"}])
def test_compositions_trace_the_model_once(traces, options):
    model = seeded(MultiScaleNet) if options.get("output") == "argmax" else \
        seeded(FaultSeg3D, width=4)
    vol = random_volume((16, 16, 24) if "pad" not in options else (14, 16, 21), seed=2)
    y = volarray.predict(model, vol, chunks=8, **options)
    assert traces["trace"] == 1
    y.compute()
    assert traces["trace"] == 1


def test_an_ensemble_traces_once_in_exact_mode_and_hashes_once_in_window_mode(traces):
    vol = random_volume((12, 14, 10), seed=3)
    mean, std = volarray.predict(mc_dropout(), vol, ensemble=4, chunks=6)
    assert traces["trace"] == 1
    flipped = volarray.predict(seeded(FaultSeg3D, width=4), random_volume((16, 16, 16)),
                               method="window", roi_size=8, tta="flips")
    assert traces["weights"] == 1 and flipped.shape == (1, 16, 16, 16)


def test_the_pieces_compose_to_what_predict_returns():
    model, vol = seeded(FaultSeg3D, width=4), random_volume((16, 24, 16), seed=4)
    exact = volarray.Exact(model, chunks=(8, 16, 8))
    assert_volume_close(exact(vol).compute(), whole_volume(model, vol))
    assert_volume_close(volarray.flips(exact, vol).compute(),
                        volarray.predict(model, vol, chunks=(8, 16, 8), tta="flips").compute(),
                        atol=0)
    window = volarray.Window(model, roi_size=8, overlap=0.5, blend_mode="constant")
    assert_volume_close(window(vol).compute(),
                        volarray.predict(model, vol, method="window", roi_size=8, overlap=0.5,
                                         blend_mode="constant").compute(), atol=0)
    faults = volarray.labels(exact(vol), threshold=0.5)
    assert faults.dtype == np.uint8 and faults.shape == vol.shape
    ens = volarray.ensemble(volarray.Exact(mc_dropout(), chunks=6), vol, 3, seed=1)
    assert isinstance(ens, volarray.MeanStd) and ens.mean.shape == ens.std.shape == (2,) + vol.shape
    with pytest.raises(dataclasses.FrozenInstanceError):
        exact.chunks = 4
    plan = exact.plan(vol)
    assert "\n" not in repr(plan) and repr(plan).startswith("<volarray.Plan exact")
    assert "<table" in plan._repr_html_() and "stage" in str(plan)


@pytest.mark.parametrize("method,options,parameter", [
    ("exact", {"roi_size": 8}, "roi_size"), ("exact", {"blend_mode": "constant"}, "blend_mode"),
    ("exact", {"overlap": 0.5}, "overlap"), ("window", {"keep": "2x"}, "keep"),
    ("window", {"memory_limit": "1GB"}, "memory_limit"), ("window", {"pad": "zeros"}, "pad"),
    ("window", {"compute_dtype": "float16"}, "compute_dtype")])
def test_arguments_of_the_other_method_are_refused(method, options, parameter):
    model, vol = seeded(FaultSeg3D, width=4), random_volume((16, 16, 16))
    window = {"roi_size": 8} if method == "window" else {}
    with pytest.raises(volarray.InputError, match=f"{parameter}=.*applies to method=") as e:
        volarray.predict(model, vol, method=method, **window, **options)
    assert e.value.parameter == parameter


def test_errors_name_their_parameter_and_the_cli_its_flag(capsys, tmp_path, monkeypatch):
    from volarray.cli import main
    model, vol = seeded(FaultSeg3D, width=4), random_volume((16, 16, 16))
    with pytest.raises(volarray.InputError) as e:
        volarray.predict(model, vol, method="window")
    assert e.value.parameter == "roi_size"
    with pytest.raises(volarray.InputError) as e:
        volarray.predict(model, vol, chunks=0)
    assert e.value.parameter == "chunks"
    monkeypatch.chdir(tmp_path)
    np.save("v.npy", vol)
    code = main(["predict", "v.npy", "o.zarr", "--model", "volarray.models:FaultSeg3D",
                 "--method", "window", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("volarray: error: --roi-size: --method window needs "
                                          "--roi-size, the model's patch size")
    assert not (tmp_path / "o.zarr").exists()
    from volarray.cli_errors import error_line  # another flag that begins alike is
    assert error_line(volarray.InputError("mask_fill=2 needs mask=", parameter="mask")) \
        .startswith("volarray: error: --mask: --mask-fill 2 needs")  # prefixed
    # a message that begins with the flag is not prefixed by it again
    code = main(["predict", "v.npy", "o.zarr", "--model", "volarray.models:FaultSeg3D",
                 "--memory-limit", "lots", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("volarray: error: --memory-limit lots is not a size"), err


def test_what_would_be_silently_wrong_is_refused_before_any_work(monkeypatch):
    import volarray.normalize
    model, vol = seeded(FaultSeg3D, width=4), random_volume((16, 16, 16))
    monkeypatch.setattr(volarray.normalize, "resolve", lambda *a: pytest.fail("computed"))
    with pytest.raises(volarray.InputError, match="roi_size=8 applies to method='window'"):
        volarray.predict(model, vol, normalize="percentile", roi_size=8)
    monkeypatch.undo()
    with pytest.raises(volarray.InputError, match="no dropout .* is active") as e:
        volarray.predict(model, vol, ensemble=3)  # every sample would be the same
    assert e.value.parameter == "ensemble"
    with pytest.raises(volarray.InputError, match="seed=3 seeds the samples"):
        volarray.predict(model, vol, seed=3)
    with pytest.raises(volarray.InputError, match="sigma_scale=0.2 shapes the gaussian"):
        volarray.predict(model, vol, method="window", roi_size=8, blend_mode="constant",
                         sigma_scale=0.2)
    with pytest.raises(volarray.InputError, match="sigma_scale=-1 must be positive"):
        volarray.Window(model, roi_size=8, sigma_scale=-1)
    with pytest.raises(volarray.InputError, match="has no token"):
        volarray.predict_to_zarr(model, vol, "never.zarr", predictor=volarray.Exact(model))


def test_a_predictor_follows_its_models_weights_and_threads_and_pickles(tmp_path):
    import pickle
    import threading
    model = seeded(FaultSeg3D, width=4)
    exact = volarray.Exact(model, chunks=8)
    small, other = random_volume((16, 16, 16), seed=5), random_volume((16, 24, 16), seed=6)
    before = exact(small).compute()
    weight = next(model.parameters())
    weight.data = weight.data * 2  # new storage: no version counter moves
    after = exact(small).compute()
    assert_volume_close(after, whole_volume(model, small))
    assert np.abs(after - before).max() > 1e-3
    errors = []

    def call(vol):
        try:
            for _ in range(3):
                exact(vol)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=call, args=(v,)) for v in (small, other, small, other)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and not [n for n, p in model.named_parameters() if p.is_meta]
    copy = pickle.loads(pickle.dumps(exact))  # the caches stay behind
    assert_volume_close(copy(small).compute(), after, atol=0)
