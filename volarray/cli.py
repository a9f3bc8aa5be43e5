"""The `volarray` command line."""
from __future__ import annotations

import argparse
import resource
import sys
import time


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def demo(args) -> int:
    """FaultSeg3D over a synthetic seismic volume, checked against plain torch."""
    import numpy as np
    import torch

    import volarray
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
          f"(process before the run: {rss0:.2f} GB)")
    if args.no_check:
        return 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = model(torch.from_numpy(vol)[None, None])[0].numpy()
    t_pt = time.perf_counter() - t0
    diff = float(np.abs(out - ref).max())
    print(f"plain torch model(volume): {t_pt:.2f} s, peak RSS {_peak_rss_gb():.2f} GB")
    print(f"max |volarray - torch| = {diff:.2e}  ({'exact' if diff <= 1e-5 else 'MISMATCH'})")
    return 0 if diff <= 1e-5 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="volarray", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run FaultSeg3D on a synthetic seismic volume and check "
                                    "it against plain torch")
    d.add_argument("--size", type=int, default=128, help="volume side (default 128)")
    d.add_argument("--chunks", type=int, default=None, help="chunk side (default: planned)")
    d.add_argument("--scheduler", default="threads", choices=["threads", "sync"],
                   help="in-process dask scheduler (default threads)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-check", action="store_true", help="skip the plain-torch comparison")
    args = ap.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
