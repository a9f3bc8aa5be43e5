"""The command line's arguments: `parser` for predict, plan and demo, and the flags
that belong to one kind of model only."""
from __future__ import annotations

import argparse
import json

DESCRIPTION = "The volarray command line: predict, plan, demo."
DEBUG_HELP = ("on a failure, show the full traceback (also VOLARRAY_DEBUG=1); by default "
              "one line says what failed")

# flags of a plain model's run that an nnU-Net model folder sets itself, and back
NOT_NNUNET = ("weights", "method", "memory_limit", "keep", "pad", "select", "roi_size",
              "overlap", "blend_mode", "sigma_scale", "threshold", "tta", "merge", "ensemble",
              "seed", "coords", "compute_dtype",
              "scratch", "output_dtype", "channels", "normalize", "mask", "mask_fill")
NNUNET_ONLY = ("folds", "configuration", "checkpoint", "step", "no_mirror", "no_normalize",
               "no_crop", "trust_checkpoint")



def _sides(text: str):
    """'96' -> 96, '64,128,128' -> (64, 128, 128), -1 for a whole axis, 'auto' (for
    --chunks and --roi-size)."""
    if text == "auto":
        return text
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N, Z,Y,X or auto") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r} is not N or Z,Y,X")
    return values[0] if len(values) == 1 else tuple(values)


def _tta(text: str) -> str:
    """--tta: flips, rot90, multires, or several joined by + (e.g. flips+rot90)."""
    names = text.split("+")
    known = ("flips", "rot90", "multires")
    if any(n not in known for n in names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not flips, rot90, multires or several "
                                         "of them joined by + (e.g. flips+rot90)")
    return "+".join(n for n in known if n in names)


def _channel_list(text: str) -> list[int]:
    """'1' -> [1], '0,2' -> [0, 2] (for --channels)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not C or C1,C2,...") from None


def _model_args(p, nnunet: bool = False):
    p.add_argument("input", help="zarr array, zarr group (with --var), .npy, SEG-Y (.sgy), "
                                 "MDIO (.mdio), NIfTI (.nii, .nii.gz) or TIFF (a .tif file or a "
                                 "folder of slices): a path, a URL (s3://, gs://, file://) "
                                 "read through fsspec, or a quoted glob pattern "
                                 "('scans/*.nii.gz') for a batch into the output folder")
    model_help = "MODULE:CALLABLE returning a torch.nn.Module"
    if nnunet:
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--model", help=model_help)
        which.add_argument("--nnunet", metavar="MODEL_FOLDER",
                           help="a trained nnU-Net v2 model folder (plans.json, dataset.json, "
                                "fold_N/checkpoint_final.pth). A NIfTI scan is read as nnU-Net "
                                "reads it and resampled from its header's spacing to the "
                                "model's and back; other input must be at the model's spacing, "
                                "in nnU-Net's axis order. The plans' intensity normalization is "
                                "applied with whole-image statistics")
    else:
        p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--weights", help="state dict: torch.save file or .safetensors")
    p.add_argument("--storage-options", type=_json_object, metavar="JSON",
                   help="fsspec options for URL inputs and outputs, e.g. "
                        "'{\"client_kwargs\": {\"endpoint_url\": \"http://host:9000\"}}'")
    p.add_argument("--var", help="array name inside a zarr group")
    p.add_argument("--normalize", type=_normalize,
                   help="whole-volume normalization: zscore, percentile (0.5-99.5, or "
                        "percentile:LO,HI), or given statistics MEAN,STD or MEAN,STD,CLIP_LO,"
                        "CLIP_HI (a training set's)")
    p.add_argument("--chunks", type=_sides,
                   help="chunk side N or Z,Y,X, -1 for a whole axis (default: auto, planned)")
    p.add_argument("--method", default="exact", choices=["exact", "window"],
                   help="exact (the whole-volume answer) or window (sliding window)")
    p.add_argument("--memory-limit", help="per task, e.g. 4GB")
    p.add_argument("--keep", help="exact mode: bytes of tensors kept between stages, e.g. "
                                  "40GB or 2x (the input's bytes); 0 recomputes all "
                                  "(default: 1x)")
    p.add_argument("--pad", choices=["reflect", "zeros"],
                   help="exact mode: pad sides to the network's multiple, crop back")
    p.add_argument("--mask", type=_mask, default="auto",
                   help="compute only where the mask is: a zarr array or .npy of booleans "
                        "(Z, Y, X), nonzero (voxels where the input is not 0), footprint (a "
                        "SEG-Y or MDIO survey's live traces), or none; default auto: the "
                        "survey's footprint where it has dead or missing traces")
    p.add_argument("--mask-fill", type=float,
                   help="value of the voxels outside the mask (default 0: zero probability, "
                        "the background label)")
    p.add_argument("--select", type=_index_or_key,
                   help="of several model outputs, which is the prediction: an index (default "
                        "0, nnU-Net's full-resolution head) or a dict key")


def _json_object(text: str) -> dict:
    """--storage-options: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object ({{...}})")
    return value


def _normalize(text: str):
    """--normalize: zscore | percentile[:LO,HI] | MEAN,STD[,CLIP_LO,CLIP_HI]."""
    if text in ("zscore", "percentile"):
        return text
    try:
        if text.startswith("percentile:"):
            lo, hi = (float(v) for v in text.split(":", 1)[1].split(","))
            return {"percentiles": (lo, hi)}
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        return {"mean": values[0], "std": values[1]}
    if len(values) == 4:
        return {"mean": values[0], "std": values[1], "clip": tuple(values[2:])}
    raise argparse.ArgumentTypeError(f"{text!r} is not zscore, percentile, percentile:LO,HI, "
                                     "MEAN,STD or MEAN,STD,CLIP_LO,CLIP_HI")


def _mask(text: str):
    """--mask: auto | none | nonzero | footprint | a path."""
    return None if text.lower() in ("none", "off", "false") else text


def _index_or_key(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def _predict_args(p):
    w = p.add_argument_group("window mode (--method window)")
    w.add_argument("--roi-size", type=_sides, help="window (patch) size: N or Z,Y,X")
    w.add_argument("--overlap", type=float, help="window overlap (0.25)")
    w.add_argument("--blend-mode", choices=["gaussian", "constant"], help="(gaussian)")
    w.add_argument("--sigma-scale", type=float, help="gaussian sigma / window (0.125)")
    o = p.add_argument_group("outputs")
    o.add_argument("--output", dest="output_kind", default="probabilities",
                   choices=["probabilities", "argmax", "labels", "logits"],
                   help="argmax (or labels): uint8/uint16 class labels; logits: --nnunet only")
    o.add_argument("--threshold", type=float,
                   help="labels y > T for a one-channel head (0.5 sigmoid, 0.0 logits)")
    o.add_argument("--tta", type=_tta, metavar="{flips,rot90,multires}[+...]",
                   help="test-time augmentation: flips (the 8 mirrorings), rot90 (4 turns in "
                        "the Y-X plane), multires (the volume and its [::2] decimations along "
                        "each axis, interpolated back); joined by + for every combination")
    o.add_argument("--merge", choices=["mean", "max"],
                   help="how --tta's passes are merged per voxel (default mean)")
    o.add_argument("--ensemble", type=int,
                   help="N samples of a stochastic model: writes NAME_mean and NAME_std")
    o.add_argument("--seed", type=int, default=0, help="seed of the ensemble's samples")
    o.add_argument("--coords", action="store_true", help="append global z, y, x channels")
    o.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"],
                   help="exact mode: run tiles in this type (the model cast once)")
    o.add_argument("--channels", type=_channel_list,
                   help="store only these output channels, e.g. 1 or 0,2")
    o.add_argument("--output-dtype", choices=["float32", "float16", "uint8"],
                   help="stored type of the scores: float16 halves the output, uint8 "
                   "(probabilities in [0, 1], scale 1/255 in the attributes) quarters it")
    n = p.add_argument_group("nnU-Net models (with --nnunet MODEL_FOLDER)")
    n.add_argument("--folds", nargs="+", default=["0"],
                   help="folds whose predictions are averaged, e.g. 0 1 2 3 4, or all (0)")
    n.add_argument("--configuration", help="e.g. 3d_fullres; checked against the checkpoints'")
    n.add_argument("--checkpoint", default="checkpoint_final.pth",
                   help="file in each fold_N (checkpoint_final.pth; or checkpoint_best.pth)")
    n.add_argument("--step", type=float, default=0.5,
                   help="tile step as a fraction of the patch (nnU-Net's tile_step_size, 0.5)")
    n.add_argument("--no-mirror", action="store_true", help="skip the test-time mirroring")
    n.add_argument("--no-normalize", action="store_true",
                   help="the input is normalized already (skip the plans' normalization)")
    n.add_argument("--no-crop", action="store_true",
                   help="skip nnU-Net's crop to the bounding box of nonzero voxels")
    n.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle any object in the checkpoints, as nnU-Net does (only for "
                        "files you trust); by default only tensors, numbers and numpy arrays")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="volarray", description=DESCRIPTION)
    ap.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="run a model (or an nnU-Net v2 model folder) over a "
                                       "volume into a zarr store")
    _model_args(p, nnunet=True)
    p.add_argument("output", help="zarr store to write (a group holding --name): a path or "
                                  "a URL; a .nii.gz, .sgy or (--format tiff) folder for the "
                                  "field's formats; a folder for a batch")
    p.add_argument("--name", default="prediction", help="output array name")
    p.add_argument("--device", default=None, help="cpu, cuda (every visible GPU), cuda:N, "
                   "cuda:0,2 or auto; by default the GPU the model is on, else cpu")
    p.add_argument("--scheduler", default="threads",
                   help="threads, sync, or a dask scheduler address (tcp://...)")
    p.add_argument("--scheduler-file", help="a dask cluster's scheduler file (wins over it)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--preview", help="write a PNG of three slices of input and prediction")
    p.add_argument("--scratch", default="auto", choices=["auto", "disk", "memory"],
                   help="where exact mode keeps tensors between stages (auto: on disk beside "
                        "the output past 256 MB)")
    p.add_argument("--format", choices=["zarr", "nifti", "segy", "tiff"],
                   help="output format (default: from the output's suffix, .nii/.nii.gz "
                        "NIfTI with the input's affine, .sgy/.segy SEG-Y with the input's "
                        "headers, else zarr); tiff writes a folder of slices")
    p.add_argument("--quiet", action="store_true")
    _predict_args(p)
    p.set_defaults(defaults={d: p.get_default(d) for d in NOT_NNUNET + NNUNET_ONLY})
    p = sub.add_parser("plan", help="print what predict would run, and check it fits")
    _model_args(p)
    d = sub.add_parser("demo", help="run FaultSeg3D on a synthetic seismic volume and check "
                                    "it against plain torch")
    d.add_argument("--size", type=int, default=128, help="volume side (default 128)")
    d.add_argument("--chunks", type=int, default=None, help="chunk side (default: planned)")
    d.add_argument("--scheduler", default="threads", choices=["threads", "sync"],
                   help="in-process dask scheduler (default threads)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-check", action="store_true", help="skip the plain-torch comparison")
    c = sub.add_parser("calibrate", help="measure this machine's rates for the plans' "
                                         "projected time (MAC/s, storage bytes/s, task "
                                         "overhead) and cache them")
    c.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    c.add_argument("--scratch-dir", help="folder whose storage is measured (default: the "
                                         "temporary directory)")
    for command in (p, d, c, sub.choices["predict"]):  # also after the command's name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=DEBUG_HELP)
    ap.commands = sub.choices  # name -> its parser
    return ap


def option_names(ap: argparse.ArgumentParser | None = None) -> dict[str, object]:
    """Every ``--flag`` of every command, with its ``nargs`` (``"+"``: values follow it
    apart, ``--folds 0 1``), to name flags in messages."""
    ap = ap or parser()
    names = {}
    for command in ap.commands.values():
        for action in command._actions:
            names.update((o, action.nargs) for o in action.option_strings if o.startswith("--"))
    return names
