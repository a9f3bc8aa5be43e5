"""The `volarray` command line: predict, plan, demo."""
from __future__ import annotations

import argparse
import json
import contextlib
import importlib
import os
import resource
import sys
import time
from pathlib import Path


class CLIError(Exception):
    """A problem worth one line on stderr, not a traceback."""


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def load_model(spec: str, weights: str | None):
    """``MODULE:CALLABLE`` (imported from the current directory or the Python path),
    called with no arguments, with weights from ``torch.load(weights_only=True)`` or a
    safetensors file. Never unpickles arbitrary objects."""
    import torch
    if ":" not in spec:
        raise CLIError(f"--model {spec!r} is not MODULE:CALLABLE, e.g. "
                       "volarray.models:FaultSeg3D")
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise CLIError(f"--model {spec!r}: cannot import {module_name!r} "
                       f"({type(e).__name__}: {e})") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise CLIError(f"--model {spec!r}: {module_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as e:
        raise CLIError(f"--model {spec!r}: calling {attr}() failed ({type(e).__name__}: {e})") from e
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"--model {spec!r}: {attr}() returned a {type(model).__name__}, "
                       "not a torch.nn.Module")
    if weights:
        from volarray.weights import load_weights
        load_weights(model, weights)  # one-line InputError naming the keys on a mismatch
    return model.eval()


def _scheduler(value: str, scheduler_file=None):
    if scheduler_file:  # a cluster's scheduler file (dask scheduler --scheduler-file F)
        from volarray.cluster import connect
        return (client := connect(scheduler_file)), client
    if value in ("threads", "sync", "synchronous", "processes"):
        return value, None
    from distributed import Client
    try:
        client = Client(value, timeout="10s")
    except Exception as e:
        raise CLIError(f"--scheduler {value!r}: cannot reach a dask scheduler there "
                       f"({type(e).__name__}: {e}); pass threads, sync or an address") from e
    return client, client


def preview(volume, prediction, path: str):
    """Three orthogonal slices through the middle of the input and the prediction."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CLIError("--preview needs matplotlib: pip install matplotlib") from e
    import numpy as np
    vol = volume if volume.ndim == 3 else volume[0]
    if prediction.ndim == 3:  # labels
        pred = prediction
    else:
        pred = prediction[0] if prediction.shape[0] == 1 else np.argmax(prediction[...], axis=0)
    fig, axes = plt.subplots(2, 3, figsize=(11, 7))
    names = ("z", "y", "x")
    for row, (data, title, cmap) in enumerate(((vol, "input", "gray"),
                                               (pred, "prediction", "magma"))):
        for axis in range(3):
            index = [slice(None)] * 3
            index[axis] = data.shape[axis] // 2
            img = np.asarray(data[tuple(index)])
            ax = axes[row, axis]
            ax.imshow(img, cmap=cmap, aspect="auto")
            ax.set_title(f"{title}, {names[axis]} = {data.shape[axis] // 2}")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def check_preview_path(path: str | None) -> None:
    """Before anything runs: a picture that cannot be written must not cost a run."""
    if path is None:
        return
    p = Path(path)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:
        raise CLIError("--preview needs matplotlib: pip install matplotlib") from e
    formats = FigureCanvasBase.get_supported_filetypes()
    if p.suffix.lstrip(".").lower() not in formats:
        raise CLIError(f"--preview {path!r}: the file name must end in one of "
                       f"{', '.join('.' + f for f in sorted(formats))}, e.g. preview.png")
    folder = p.resolve().parent
    if not folder.is_dir():
        raise CLIError(f"--preview {path!r}: the folder {str(folder)!r} does not exist; "
                       "create it or pass another path")
    if not os.access(folder, os.W_OK) or p.is_dir():
        raise CLIError(f"--preview {path!r} cannot be written here; pass another path")


def predict_options(args) -> dict:
    """`predict`'s keyword arguments from the command line's flags."""
    return dict(chunks=args.chunks, method=args.method, device=args.device,
                memory_limit=args.memory_limit, roi_size=args.roi_size, overlap=args.overlap,
                blend_mode=args.blend_mode, sigma_scale=args.sigma_scale, tta=args.tta,
                output=args.output_kind, threshold=args.threshold, coords=args.coords,
                ensemble=args.ensemble, seed=args.seed, compute_dtype=args.compute_dtype,
                pad=args.pad,
                select=args.select, output_dtype=args.output_dtype, keep=args.keep,
                channels=args.channels, normalize=args.normalize)


# flags of a plain model's run that an nnU-Net model folder sets itself, and back
NOT_NNUNET = ("weights", "method", "memory_limit", "keep", "pad", "select", "roi_size",
              "overlap", "blend_mode", "sigma_scale", "threshold", "tta", "ensemble", "seed",
              "coords", "compute_dtype",
              "scratch", "output_dtype", "channels", "normalize")
NNUNET_ONLY = ("folds", "configuration", "checkpoint", "step", "no_mirror", "no_normalize",
               "no_crop", "trust_checkpoint")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_flags(args, defaults) -> None:
    """Flags that mean nothing for the kind of model given are refused, not ignored."""
    if args.nnunet:
        given = [d for d in NOT_NNUNET if getattr(args, d) != defaults[d]]
        if given:
            raise CLIError(f"{', '.join(_flag(d) for d in given)}: not for --nnunet runs, "
                           "whose model folder sets nnU-Net's network, patch, gaussian, "
                           "mirroring and normalization; leave it out")
        return
    given = [d for d in NNUNET_ONLY if getattr(args, d) != defaults[d]]
    if given:
        raise CLIError(f"{', '.join(_flag(d) for d in given)}: only for --nnunet "
                       "MODEL_FOLDER runs; leave it out with --model")
    if args.output_kind == "logits":
        raise CLIError("--output logits applies to --nnunet models; a --model's output is "
                       "what its forward returns (--output probabilities)")


def _model_writer(args):
    """The run of a MODULE:CALLABLE model: predict_to_zarr with predict's options."""
    import volarray
    model = load_model(args.model, args.weights)
    options = predict_options(args)
    if options["output"] == "labels":
        options["output"] = "argmax"

    def write(scheduler, source, target, resume):
        return volarray.predict_to_zarr(
            model, source, target, name=args.name, var=args.var,
            overwrite=args.overwrite and not resume, resume=resume, scheduler=scheduler,
            scratch={"auto": "auto", "disk": True, "memory": False}[args.scratch],
            storage_options=args.storage_options, **options)
    return write


def _nnunet_writer(args):
    """The run of an nnU-Net v2 model folder (volarray.nnunet): the plans'
    normalization, nnU-Net's tiles, gaussian, mirroring and folds, then probabilities,
    labels or logits."""
    from volarray.nnunet import load_nnunet, predict_nnunet_to_zarr
    model = load_nnunet(args.nnunet, folds=args.folds, configuration=args.configuration,
                        checkpoint=args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    output = {"argmax": "labels"}.get(args.output_kind, args.output_kind)

    def write(scheduler, source, target, resume):
        return predict_nnunet_to_zarr(
            model, source, target, name=args.name, var=args.var,
            overwrite=args.overwrite and not resume, resume=resume, scheduler=scheduler,
            output=output,
            tile_step_size=args.step, mirror=not args.no_mirror,
            normalize=not args.no_normalize, crop_nonzero=not args.no_crop,
            chunks=args.chunks, device=args.device, storage_options=args.storage_options)
    return write


def cmd_predict(args) -> int:
    from volarray.outputs import RunInterrupted
    check_flags(args, args.defaults)
    check_preview_path(args.preview)
    jobs = batch_jobs(args.input, args.output, args.format, args.resume, args.overwrite)
    write = _nnunet_writer(args) if args.nnunet else _model_writer(args)
    scheduler, client = _scheduler(args.scheduler, args.scheduler_file)
    try:
        for source, target, fmt in jobs:
            code = _predict_one(args, write, scheduler, client, source, target, fmt)
            if code:
                return code
    except RunInterrupted as e:
        print(f"volarray: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if client is not None:
            client.close()
    return 0


def batch_jobs(source: str, target: str, fmt: str | None, resume: bool, overwrite: bool):
    """``(input, output, format)`` runs: one, or one per file of a glob pattern
    (``'scans/*.nii.gz'``) into the folder ``target``, each output named after its
    input. A file whose output is complete is skipped on ``--resume``; any other
    existing output stops the batch before anything runs."""
    from volarray.formats import output_format
    if not any(ch in source for ch in "*?[") or "://" in source or os.path.exists(source):
        return [(source, target, output_format(target, fmt))]
    import glob
    files = sorted(glob.glob(source))
    if not files:
        raise CLIError(f"input pattern {source!r} matches no file")
    if os.path.exists(target) and not os.path.isdir(target):
        raise CLIError(f"output {target!r} is a file; a batch writes one output per input "
                       "into a folder")
    fmt = fmt or "zarr"
    suffix = {"zarr": ".zarr", "nifti": ".nii.gz", "segy": ".sgy", "tiff": ""}[fmt]
    stems = [_stem(f) for f in files]
    if len(set(stems)) != len(stems):
        raise CLIError(f"input pattern {source!r} matches files of the same name in "
                       "different folders; run them as separate batches")
    jobs = [(f, os.path.join(target, stem + suffix), fmt) for f, stem in zip(files, stems)]
    done = [t for _, t, _ in jobs if os.path.exists(t)]
    if done and not (resume or overwrite):
        raise CLIError(f"{len(done)} of the batch's outputs exist already (e.g. {done[0]!r}); "
                       "pass --resume to finish the batch or --overwrite to replace them")
    os.makedirs(target, exist_ok=True)
    return jobs


def _stem(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    for suffix in (".nii.gz", ".nii", ".sgy", ".segy", ".tiff", ".tif", ".zarr", ".npy",
                   ".mdio"):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def _predict_one(args, write, scheduler, client, source, target, fmt) -> int:
    """One input to one output: a zarr store, or (``fmt`` nifti, segy, tiff) a zarr
    work store beside the target, exported when complete and then removed (a stopped
    run resumes from it with --resume)."""
    from volarray.formats import export_prediction
    store = target
    if fmt != "zarr":
        check_exportable(args, fmt)
        store = target.rstrip("/") + ".volarray.zarr"
        if os.path.exists(target) and args.resume:  # exports are moved into place whole
            _remove_work_store(store)
            if not args.quiet:
                print(f"{target} is complete: skipped")
            return 0
        export_prediction(None, target, fmt, like=source, overwrite=args.overwrite,
                          check_only=True)  # before the run, not after it
    t0 = time.perf_counter()
    from tqdm.dask import TqdmCallback
    # tasks done, rate and time left (on a cluster, its dashboard shows the same)
    bar = TqdmCallback(desc="volarray", mininterval=1.0, file=sys.stderr, leave=False)
    resume = args.resume or (fmt != "zarr" and os.path.exists(store) and not args.overwrite)
    from volarray.outputs import is_complete
    complete = resume and is_complete(store, args.storage_options)  # nothing left to compute
    with bar if client is None and not args.quiet else contextlib.nullcontext():
        result = write(scheduler, source, store, resume)
    results = result if isinstance(result, tuple) else (result,)
    code = _preview(args, source, results[0], target) if args.preview else 0
    if fmt != "zarr":
        export_prediction(results[0], target, fmt, like=source, overwrite=args.overwrite)
        _remove_work_store(store)
    if not args.quiet:
        for r in results:
            where = target if fmt != "zarr" else f"{target}/{r.basename}"
            print(f"{where} {r.shape} was already complete: nothing was computed" if complete
                  and fmt == "zarr" else f"wrote {where} {r.shape} in "
                  f"{time.perf_counter() - t0:.1f} s, peak RSS {_peak_rss_gb():.2f} GB")
        if args.preview and not code:
            print(f"preview: {args.preview}")
    return code


def check_exportable(args, fmt: str) -> None:
    """Outputs a NIfTI, SEG-Y or TIFF file cannot hold, refused before the run."""
    if getattr(args, "ensemble", None):
        raise CLIError(f"--ensemble writes NAME_mean and NAME_std; --format {fmt} holds one "
                       "array: write zarr")
    if getattr(args, "output_dtype", None) == "uint8":
        raise CLIError(f"--output-dtype uint8 keeps its 1/255 scale in zarr's attributes, "
                       f"which --format {fmt} would lose: write float16 or zarr")


def _remove_work_store(store: str) -> None:
    from volarray.location import Location
    from volarray.outputs import remove_output
    remove_output(Location.of(store), missing_ok=True)


def _preview(args, source, result, target) -> int:
    from volarray.io import open_volume
    try:
        preview(open_volume(source, args.var, args.storage_options), result, args.preview)
    except Exception as e:  # the run is finished and stays so
        print(f"volarray: error: the output {str(target)!r} is complete, but the preview "
              f"{args.preview!r} could not be drawn ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 1
    return 0


def cmd_plan(args) -> int:
    import volarray
    from volarray.io import open_volume
    if args.method != "exact":
        raise CLIError(f"--method {args.method}: volarray plan shows exact mode's plan; window "
                       "mode runs one task per window and one per output chunk, nothing to plan")
    model = load_model(args.model, args.weights)
    plan = volarray.plan(model, open_volume(args.input, args.var, args.storage_options),
                         chunks=args.chunks, memory_limit=args.memory_limit, pad=args.pad,
                         select=args.select, keep=args.keep, scratch=True)
    print(plan)
    plan.validate()
    return 0


def cmd_demo(args) -> int:
    """FaultSeg3D over a synthetic seismic volume, checked against plain torch."""
    import numpy as np
    import torch

    import volarray
    from volarray.heap import huge_pages_off, huge_pages_requested, worth_huge_pages
    from volarray.models import FaultSeg3D, seeded
    from volarray.synthetic import seismic

    shape = (args.size,) * 3
    print(f"synthetic seismic volume {shape} with faults; FaultSeg3D with seeded weights")
    vol, _ = seismic(shape, seed=args.seed)
    model = seeded(FaultSeg3D)
    plan = volarray.plan(model, vol, chunks=args.chunks)
    print(plan, end="\n\n")
    rss0 = _peak_rss_gb()
    t0 = time.perf_counter()
    out = volarray.predict(model, vol, chunks=args.chunks).compute(scheduler=args.scheduler)
    t_va = time.perf_counter() - t0
    rss_va = _peak_rss_gb()
    print(f"volarray ({args.scheduler} scheduler): {t_va:.2f} s, peak RSS {rss_va:.2f} GB "
          f"(process before the run: {rss0:.2f} GB; huge pages requested: "
          f"{'yes' if huge_pages_requested() else 'no'})")
    if args.no_check:
        return 0
    # plain torch as volarray ran: off huge pages if the run was short (volarray/heap.py),
    # where this process's first huge-page faults would cost it more than torch's default
    t0 = time.perf_counter()
    with torch.inference_mode(), huge_pages_off(not worth_huge_pages(plan.planned_macs)):
        ref = model(torch.from_numpy(vol)[None, None])[0].numpy()
    t_pt = time.perf_counter() - t0
    diff = float(np.abs(out - ref).max())
    print(f"plain torch model(volume): {t_pt:.2f} s, peak RSS {_peak_rss_gb():.2f} GB")
    print(f"max |volarray - torch| = {diff:.2e}  ({'exact' if diff <= 1e-5 else 'MISMATCH'})")
    return 0 if diff <= 1e-5 else 1


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
                                "fold_N/checkpoint_final.pth). The input must already be at the "
                                "model's target spacing, in nnU-Net's axis order: volarray does "
                                "not resample. The plans' intensity normalization is applied "
                                "with whole-image statistics")
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
    o.add_argument("--tta", choices=["flips"], help="mean over the 8 mirrorings")
    o.add_argument("--ensemble", type=int,
                   help="N samples of a stochastic model: writes NAME_mean and NAME_std")
    o.add_argument("--seed", type=int, default=0, help="seed of the ensemble's samples")
    o.add_argument("--coords", action="store_true", help="append global z, y, x channels")
    o.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"],
                   help="exact mode: run tiles under torch.autocast in this type")
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
    ap = argparse.ArgumentParser(prog="volarray", description=__doc__)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
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
    p.set_defaults(func=cmd_predict)
    p.set_defaults(defaults={d: p.get_default(d) for d in NOT_NNUNET + NNUNET_ONLY})
    p = sub.add_parser("plan", help="print what predict would run, and check it fits")
    _model_args(p)
    p.set_defaults(func=cmd_plan)
    d = sub.add_parser("demo", help="run FaultSeg3D on a synthetic seismic volume and check "
                                    "it against plain torch")
    d.add_argument("--size", type=int, default=128, help="volume side (default 128)")
    d.add_argument("--chunks", type=int, default=None, help="chunk side (default: planned)")
    d.add_argument("--scheduler", default="threads", choices=["threads", "sync"],
                   help="in-process dask scheduler (default threads)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-check", action="store_true", help="skip the plain-torch comparison")
    d.set_defaults(func=cmd_demo)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from volarray.errors import VolarrayError
    try:
        return args.func(args)
    except KeyboardInterrupt:  # before the run started writing: nothing to keep
        if args.debug:
            raise
        print("volarray: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (CLIError, VolarrayError) as e:
        if args.debug:
            raise
        print(error_line(e), file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 1: a valid request that could not run now


# parameters whose flag is not --<name with dashes>; None: the API's only
FLAG_OF = {"output": "--output", "tile_step_size": "--step", "mirror": "--no-mirror",
           "crop_nonzero": "--no-crop", "store": None, "volume": None, "dims": None,
           "placement": None, "channel_dim": None, "predictor": None, "multiple": None,
           "cache": None}


def flag_of(parameter: str | None) -> str | None:
    """The command line's name for the API parameter an error names, if it has one."""
    if parameter is None:
        return None
    return FLAG_OF.get(parameter, "--" + parameter.replace("_", "-"))


def error_line(e: Exception) -> str:
    """``volarray: error: [--flag: ]message``: the flag of the parameter at fault, from
    the error's ``parameter`` (the message itself is the API's)."""
    flag = flag_of(getattr(e, "parameter", None))
    return f"volarray: error: {flag + ': ' if flag else ''}{e}"


if __name__ == "__main__":
    sys.exit(main())
