"""load_weights: the usual checkpoint layouts load into the model (and really change its
weights); every refusal is one line that names the file, the keys or shapes, and the fix."""
import sys
import warnings
from collections import OrderedDict

import pytest
import torch

from volarray.errors import InputError, VolarrayError
from volarray.models import FaultSeg3D, seeded
from volarray.weights import load_weights


def target(width=4):
    """The model to load into: seed 0, so that it differs from the trained weights."""
    return seeded(FaultSeg3D, seed=0, width=width)


@pytest.fixture(scope="module")
def trained():
    return seeded(FaultSeg3D, seed=1, width=4)


@pytest.fixture(scope="module")
def sd(trained):
    return trained.state_dict()


def save(obj, tmp_path, name="w.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def assert_holds(model, trained):
    """The model now computes what the trained one does, parameter for parameter."""
    assert not torch.equal(target().head.weight, trained.head.weight)  # the test can fail
    for (k, a), (_, b) in zip(model.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.inference_mode():
        assert torch.equal(model(x), trained(x))


def refusal(model, path, **kw) -> str:
    """The one-line message load_weights raises."""
    with pytest.raises(InputError) as info:
        load_weights(model, path, **kw)
    message = str(info.value)
    assert isinstance(info.value, VolarrayError)
    assert "\n" not in message and "\x1b" not in message, message
    assert str(path) in message
    return message


# --- layouts that load -------------------------------------------------------------------

def test_plain_state_dict(tmp_path, sd, trained):
    model = target()
    assert load_weights(model, save(sd, tmp_path)) is model
    assert_holds(model, trained)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model._orig_mod."])
def test_wrapper_prefix_removed(tmp_path, sd, trained, prefix):
    model = load_weights(target(), save({prefix + k: v for k, v in sd.items()}, tmp_path))
    assert_holds(model, trained)


@pytest.mark.parametrize("key", ["model", "model_state_dict", "net", "weights", "params"])
def test_state_dict_under_a_checkpoint_key(tmp_path, sd, trained, key):
    model = load_weights(target(), save({key: sd, "epoch": 7}, tmp_path))
    assert_holds(model, trained)


def test_lightning_checkpoint(tmp_path, sd, trained):
    checkpoint = {
        "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0",
        "state_dict": {"model." + k: v for k, v in sd.items()},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0),
                                            "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-3, "params": [0]}]}],
        "lr_schedulers": [],
    }
    model = load_weights(target(), save(checkpoint, tmp_path, "last.ckpt"))
    assert_holds(model, trained)


def test_lightning_keys_outside_the_network_are_left_out(tmp_path, sd, trained):
    """A LightningModule's loss may carry buffers next to ``model.``; they are not the net's."""
    state = {"model." + k: v for k, v in sd.items()} | {"criterion.pos_weight": torch.ones(1)}
    model = load_weights(target(), save({"state_dict": state}, tmp_path))
    assert_holds(model, trained)


def test_nnunet_checkpoint(tmp_path, sd, trained):
    checkpoint = {"network_weights": sd, "trainer_name": "x", "current_epoch": 1000,
                  "optimizer_state": {"param_groups": [{"lr": 0.01}]}}
    model = load_weights(target(), save(checkpoint, tmp_path, "checkpoint_final.pth"))
    assert_holds(model, trained)


def test_nested_checkpoint_with_prefix(tmp_path, sd, trained):
    checkpoint = {"checkpoint": {"model": {"module." + k: v for k, v in sd.items()}}}
    assert_holds(load_weights(target(), save(checkpoint, tmp_path)), trained)


def test_best_fitting_candidate_is_chosen(tmp_path, sd, trained):
    """A checkpoint with a discriminator or another net too: the dict that fits is used."""
    other = seeded(FaultSeg3D, seed=2, width=8).state_dict()
    model = load_weights(target(), save({"model": other, "ema": sd}, tmp_path))
    assert_holds(model, trained)


def test_shared_prefix_not_stripped_when_model_has_it(tmp_path):
    """Keys all under ``model.`` that the model itself names so stay as they are."""
    class Wrapper(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.model = seeded(FaultSeg3D, seed=seed, width=4)
    trained = Wrapper(1)
    model = load_weights(Wrapper(0), save(trained.state_dict(), tmp_path))
    assert torch.equal(model.model.head.weight, trained.model.head.weight)


def test_batchnorm_counter_may_be_absent(tmp_path):
    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    trained = net(1)
    trained[1].running_mean.fill_(0.5)
    old = {k: v for k, v in trained.state_dict().items() if "num_batches_tracked" not in k}
    model = load_weights(net(0), save(old, tmp_path))
    assert torch.equal(model[1].running_mean, trained[1].running_mean)
    assert torch.equal(model[0].weight, trained[0].weight)


def test_metadata_survives_prefix_removal(tmp_path, sd):
    state = OrderedDict(("module." + k, v) for k, v in sd.items())
    state._metadata = OrderedDict([("module", {"version": 1}), ("module.head", {"version": 1})])
    model = target()
    seen = []
    model.head._register_load_state_dict_pre_hook(
        lambda state_dict, prefix, local_metadata, *a: seen.append(local_metadata))
    load_weights(model, save(state, tmp_path))
    assert seen == [{"version": 1}]


def test_not_strict_loads_what_both_have(tmp_path, sd, trained):
    partial = {k: v for k, v in sd.items() if not k.startswith("head.")}
    model = load_weights(target(), save(partial | {"extra.w": torch.ones(1)}, tmp_path),
                         strict=False)
    assert torch.equal(model.enc1[0].weight, trained.enc1[0].weight)
    assert torch.equal(model.head.weight, target().head.weight)


# --- refusals ------------------------------------------------------------------------------

def test_missing_key_is_named(tmp_path, sd):
    partial = {k: v for k, v in sd.items() if k != "dec2.2.bias"}
    model = target()
    message = refusal(model, save(partial, tmp_path))
    assert "1 key missing from the file: dec2.2.bias" in message
    assert torch.equal(model.head.weight, target().head.weight)  # nothing was loaded


def test_many_missing_keys_are_counted_and_cut(tmp_path, sd):
    partial = {k: v for k, v in sd.items() if k.startswith("enc1.")}
    message = refusal(target(), save(partial, tmp_path))
    assert "26 keys missing from the file: enc2.0.weight, enc2.0.bias," in message
    assert "(and 21 more)" in message


def test_extra_key_is_named(tmp_path, sd):
    message = refusal(target(), save(dict(sd) | {"aux.weight": torch.ones(2)}, tmp_path))
    assert "1 key in the file that the model lacks: aux.weight" in message
    assert "missing" not in message


def test_renamed_key_is_both_missing_and_extra(tmp_path, sd):
    state = {("head_conv.weight" if k == "head.weight" else k): v for k, v in sd.items()}
    message = refusal(target(), save(state, tmp_path))
    assert "1 key missing from the file: head.weight" in message
    assert "1 key in the file that the model lacks: head_conv.weight" in message
    assert "another architecture" in message


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    wide = seeded(FaultSeg3D, seed=1, width=8).state_dict()
    model = target()
    message = refusal(model, save(wide, tmp_path))
    assert ("enc1.0.weight is (8, 1, 3, 3, 3) in the file but (4, 1, 3, 3, 3) in the model"
            in message)
    assert "29 shape mismatches" in message  # head.bias is (1,) at any width
    assert "width" in message
    assert torch.equal(model.enc1[0].weight, target().enc1[0].weight)


def test_shape_mismatch_refused_even_when_not_strict(tmp_path):
    wide = seeded(FaultSeg3D, seed=1, width=8).state_dict()
    assert "shape mismatch" in refusal(target(), save(wide, tmp_path), strict=False)


def test_unrelated_prefix_is_suggested(tmp_path, sd):
    state = {"backbone." + k: v for k, v in sd.items()} | {"classifier.weight": torch.ones(3)}
    message = refusal(target(), save(state, tmp_path))
    assert "30 keys missing from the file" in message
    assert "prefix 'backbone.'" in message


def test_whole_pickled_model(tmp_path, trained):
    message = refusal(target(), save(trained, tmp_path, "model.pt"))
    assert "pickled model object" in message and "FaultSeg3D" in message
    assert "torch.save(model.state_dict(), path)" in message


def test_whole_pickled_model_legacy_format(tmp_path, trained):
    path = tmp_path / "model.pt"
    torch.save(trained, path, _use_new_zipfile_serialization=False)
    message = refusal(target(), path)
    assert "pickled model object" in message and "state_dict()" in message


def test_other_pickled_objects(tmp_path, sd):
    message = refusal(target(), save({"state_dict": sd, "args": OptionsLike()}, tmp_path))
    assert "pickled Python objects" in message and "OptionsLike" in message
    assert "state_dict()" in message


class OptionsLike:
    """Stands for the argparse/omegaconf objects that training scripts put in checkpoints."""


def test_garbage_bytes(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"garbage" * 10)
    message = refusal(target(), path)
    assert "is not a weights file torch can load safely" in message
    # torch's reason, without its paragraphs about weights_only=False
    assert "UnpicklingError: Unsupported operand" in message
    assert "Weights only load failed" not in message and "weights_only" not in message


def test_empty_file(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"")
    assert "is empty" in refusal(target(), path)


def test_missing_file(tmp_path):
    message = refusal(target(), tmp_path / "nope.pt")
    assert "does not exist" in message


def test_directory(tmp_path):
    assert "is not a file" in refusal(target(), tmp_path)


def test_not_a_state_dict(tmp_path):
    assert "holds a list" in refusal(target(), save([1, 2], tmp_path))
    assert "holds a single tensor of shape (3,)" in refusal(target(), save(torch.ones(3), tmp_path))
    message = refusal(target(), save({"epoch": 3, "lr": 0.1}, tmp_path))
    assert "holds a dict with keys 'epoch', 'lr'" in message


def test_torchscript_archive(tmp_path):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 1)), path)
    message = refusal(target(), path)
    assert "TorchScript" in message and "torch.jit.load(path).state_dict()" in message


def test_safetensors_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"{}")
    with pytest.raises(InputError, match=r"needs `pip install safetensors`"):
        load_weights(target(), path)


def test_safetensors(tmp_path, sd, trained):
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "w.safetensors"
    st.save_file({"module." + k: v.contiguous() for k, v in sd.items()}, str(path))
    assert_holds(load_weights(target(), path), trained)


def test_quoted_torch_errors_are_one_plain_line():
    from volarray.weights import error_summary
    e = RuntimeError("\x1b[1mWeights only load failed\x1b[0m. Advice.\n\n"
                     "\tWeightsUnpickler error: \n\nUnsupported \x1b[31mthing\x1b[0m\n"
                     "  here\n\nDocs.")
    assert error_summary(e) == "RuntimeError: Unsupported thing here"
    assert error_summary(EOFError("")) == "EOFError"
