"""How much memory-bound work each kind of tile op costs per byte of its output,
against a ReLU's. The cost model charges every op's output bytes at the memory rate
(`volarray.rates.measure_memory`, whose probe is an out-of-place ReLU and a copy), each
weighed by its op's `memory_passes`: 1 for ReLU-like ops, these ratios for the rest.

    python benchmarks/bench_op_rates.py [--side 96] [--channels 16] [--repeats 5]

Each op runs as tiles run it: on a channels-last (1, C, side/3, side, side) slab,
out of place, its output fresh each call. Prints a markdown table; the medians of
``--repeats`` fastest of 30 or more calls, as the calibration measures its probe
(`volarray.rates.steady_seconds`).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from volarray.ops.reduce import channel_var_mean
from volarray.rates import steady_seconds


def cases(x, y):
    """name -> (call, bytes of its output, or for statistics of its input)."""
    c = x.shape[1]
    nb = x.numel() * x.element_size()
    half = x[:, :, : x.shape[2] // 2, : x.shape[3] // 2, : x.shape[4] // 2]
    w, b = torch.randn(c), torch.randn(c)
    m, v = torch.randn(c), torch.rand(c) + 0.5
    buf = torch.empty_like(x)
    return {
        "probe: ReLU + copy": (lambda: buf.copy_(torch.relu(x)), nb),
        "relu": (lambda: torch.relu(x), nb),
        "add": (lambda: x + y, nb),
        "norm apply (batch_norm)": (lambda: F.batch_norm(x, m, v, w, b, False, 0.0, 1e-5), nb),
        "silu": (lambda: F.silu(x), nb),
        "sigmoid": (lambda: torch.sigmoid(x), nb),
        "gelu": (lambda: F.gelu(x), nb),
        "cat (channels)": (lambda: torch.cat([x, y], 1), 2 * nb),
        "softmax (channels)": (lambda: torch.softmax(x, 1), nb),
        "statistics (per input byte)": (lambda: channel_var_mean(x), nb),
        "max_pool 2": (lambda: F.max_pool3d(x, 2), nb // 8),
        "avg_pool 2": (lambda: F.avg_pool3d(x, 2), nb // 8),
        "upsample x2 trilinear": (lambda: F.interpolate(half, scale_factor=2, mode="trilinear"),
                                  8 * half.numel() * 4),
        "upsample x2 nearest": (lambda: F.interpolate(half, scale_factor=2, mode="nearest"),
                                8 * half.numel() * 4),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    shape = (1, a.channels, a.side // 3, a.side, a.side)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    y = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    rows = []
    with torch.inference_mode():
        for name, (fn, nbytes) in cases(x, y).items():
            rows.append((name, nbytes / steady_seconds(fn, repeats=a.repeats)))
    relu = dict(rows)["relu"]
    print(f"{torch.get_num_threads()} threads, slab {shape[1:]} channels-last float32\n")
    print("| op | GB/s of output | cost per byte against a ReLU's (memory_passes) |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate / 1e9:.2f} | {relu / rate:.2f} |")


if __name__ == "__main__":
    main()
