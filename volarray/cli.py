"""The `volarray` command line: predict, plan, demo. Its arguments are in `cli_parser`,
what it says on a failure or Ctrl-C in `cli_errors`."""
from __future__ import annotations

import contextlib
import importlib
import os
import resource
import sys
import time
from pathlib import Path

from .cli_errors import (RUN, CLIError, RunFailed, command_line_process, debug_wanted,
                         error_line, exit_now, failure_line, flag_of, second_interrupt_exits,
                         unexpected_line, warnings_in_one_line, what_to_fix)
from .cli_parser import NNUNET_ONLY, NOT_NNUNET, parser

__all__ = ["main", "parser", "load_model", "preview", "CLIError", "error_line", "flag_of"]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def load_model(spec: str, weights: str | None):
    """``MODULE:CALLABLE`` (imported from the current directory or the Python path),
    called with no arguments, with weights from ``torch.load(weights_only=True)`` or a
    safetensors file, in ``eval()`` mode if every module was still in training mode
    (a model as built). Never unpickles arbitrary objects."""
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
    if all(m.training for m in model.modules()):
        model.eval()  # as built (torch's default mode): nobody chose its modes
    # else the callable set modes itself (a dropout left active for --ensemble): kept,
    # and a module left in training mode by mistake is refused by name, as in Python
    return model


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


# predict's options without a flag, and the flags stored under another name
NO_FLAG = ("strategy", "output_array")  # the API's only (a CLI run writes zarr)
FLAG_DEST = {"output": "output_kind"}


def predict_options(args) -> dict:
    """`predict`'s keyword arguments from the command line's flags, by the names the
    options object declares (`volarray.options.OPTION_NAMES`)."""
    from .options import OPTION_NAMES
    return {name: getattr(args, FLAG_DEST.get(name, name)) for name in OPTION_NAMES
            if name not in NO_FLAG}


def check_flags(args, defaults) -> None:
    """Flags that mean nothing for the kind of model given are refused, not ignored."""
    if args.nnunet:
        given = [d for d in NOT_NNUNET if getattr(args, d) != defaults[d]]
        if given:
            raise CLIError(f"{', '.join(flag_of(d) for d in given)}: not for --nnunet runs, "
                           "whose model folder sets nnU-Net's network, patch, gaussian, "
                           "mirroring and normalization; leave it out")
        return
    given = [d for d in NNUNET_ONLY if getattr(args, d) != defaults[d]]
    if given:
        raise CLIError(f"{', '.join(flag_of(d) for d in given)}: only for --nnunet "
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
    from volarray.formats import written_by_volarray
    foreign = [t for t in done if not written_by_volarray(t, fmt)]
    if foreign:  # before the first job runs, not when the batch reaches it
        raise CLIError(f"{len(foreign)} of the batch's outputs exist without volarray's mark "
                       f"(e.g. {foreign[0]!r}); volarray replaces or skips only its own "
                       "outputs: pass another output folder, or remove them yourself")
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
    from volarray.formats import export_prediction, written_by_volarray
    store = target
    if fmt != "zarr":
        check_exportable(args, fmt)
        store = target.rstrip("/") + ".volarray.zarr"
        if os.path.exists(target) and args.resume and written_by_volarray(target, fmt):
            # exports are moved into place whole: one there is complete
            _remove_work_store(store)
            if not args.quiet:
                print(f"{target} is complete: skipped")
            return 0
        export_prediction(None, target, fmt, like=source, overwrite=args.overwrite,
                          check_only=True)  # before the run, not after it
    t0 = time.perf_counter()
    from tqdm.dask import TqdmCallback
    # tasks done, rate and time left (on a cluster, its dashboard shows the same)
    bar = TqdmCallback(desc="volarray: computing", mininterval=1.0, file=sys.stderr,
                       leave=False)
    resume = args.resume or (fmt != "zarr" and os.path.exists(store) and not args.overwrite)
    from volarray.outputs import is_complete
    complete = resume and is_complete(store, args.storage_options)  # nothing left to compute
    terminal = not args.quiet and sys.stderr.isatty()  # a log gets no bar of \r's
    with bar if client is None and terminal else contextlib.nullcontext(), \
            phase_lines(terminal):
        result = run_writer(args, write, scheduler, source, store, resume)
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


@contextlib.contextmanager
def phase_lines(show: bool):
    """While the block runs, the phases before the bar (tracing, checking, planning) as
    lines on stderr: on a terminal, unless --quiet (a failure stays one line in a log)."""
    import logging
    log = logging.getLogger("volarray.progress")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("volarray: %(message)s"))
    level = log.level
    if show:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def run_writer(args, write, scheduler, source, store: str, resume: bool):
    """``write(...)``; an unexpected error once the run began (a full disk, a model
    that raises) becomes `RunFailed`, whose line says what failed and what is kept."""
    from volarray.errors import VolarrayError
    from volarray.location import Location
    try:
        replacing = args.overwrite and not resume and \
            Location.of(store, args.storage_options).exists()
    except Exception:
        replacing = False
    RUN.output = store  # for the line of a second Ctrl-C
    try:
        return write(scheduler, source, store, resume)
    except (VolarrayError, CLIError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise RunFailed(failure_line(e, kept_after(e, store, replacing, args)), e) from e


def kept_after(error: Exception, store: str, replacing: bool, args) -> str:
    """What a failed run left in ``store``, and how to finish it."""
    from volarray.location import Location
    from volarray.outputs import chunk_counts, is_volarray_output
    fix = what_to_fix(error)
    if replacing:
        return (f"The existing output {store!r} was left as it was: {fix}, then run again "
                "with --overwrite to replace it")
    try:
        out = Location.of(store, args.storage_options).refresh()
        finished, total = chunk_counts(out) if is_volarray_output(out) else (0, 0)
    except Exception:
        finished, total = 0, 0
    if not finished:
        return f"Nothing was kept in {store!r}: {fix}, then run again"
    return (f"{finished} of {total} chunks are finished and kept in {store!r}: {fix}, then "
            "run again with the same arguments and --resume to compute the rest")


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
                         select=args.select, keep=args.keep, scratch=True, mask=args.mask,
                         mask_fill=args.mask_fill)
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


def cmd_calibrate(args) -> int:
    """Measure the rates again and cache them (`volarray.rates`)."""
    from volarray import rates
    measured = rates.calibrate(args.device, args.scratch_dir)
    path = rates.save(args.device, measured)
    print(f"{rates.machine_key(args.device)}: {measured.text()}; cached in {path}")
    return 0


COMMANDS = {"predict": cmd_predict, "plan": cmd_plan, "demo": cmd_demo,
            "calibrate": cmd_calibrate}


def main(argv=None) -> int:
    """Run one command; every failure is one line on stderr and an exit code (see
    `cli_errors`), a traceback only with --debug or VOLARRAY_DEBUG=1."""
    args = parser().parse_args(argv)
    with second_interrupt_exits() as interrupted, warnings_in_one_line():
        code = run_command(args)
    if interrupted and command_line_process():
        # stopped by Ctrl-C, its line said: leave now, not after the interpreter's
        # teardown (seconds, which a second Ctrl-C would cut short with SIGINT's death)
        exit_now(None, code)
    return code


def run_command(args) -> int:
    from volarray.errors import VolarrayError
    from volarray.outputs import RunInterrupted
    try:
        return COMMANDS[args.command](args)
    except RunInterrupted as e:  # finished chunks are kept; the message says so
        print(error_line(e).replace("volarray: error: ", "volarray: ", 1), file=sys.stderr)
        return e.exit_code
    except BaseException as e:
        if debug_wanted(args) or isinstance(e, (SystemExit, GeneratorExit)):
            raise e.error if isinstance(e, RunFailed) else e
        if isinstance(e, KeyboardInterrupt):  # before the run started writing
            print("volarray: interrupted; nothing was written", file=sys.stderr)
            return 130
        if isinstance(e, (CLIError, VolarrayError)):
            print(error_line(e), file=sys.stderr)
            return getattr(e, "exit_code", 2)  # 1: a valid request that could not run now
        print(e.line if isinstance(e, RunFailed) else unexpected_line(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
