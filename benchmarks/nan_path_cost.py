"""What the exact NaN/Inf path of the grouped kernels costs (docs/performance.md, choice 5).

    python -m benchmarks.nan_path_cost [--batch 128] [--out DIR]      # GPU only

Times, on every grouped 3x3 shape of ResNeXt-50/101 in bf16, the eval-mode fused
conv + BN + ReLU and the data gradient twice: as shipped (``MULTI_GROUP``: one NaN/Inf
check per tile) and with the path switched off (the earlier kernel, which lets a NaN of
one group reach the other groups of its tile).  Same inputs, same run, alternated
on/off/on/off; writes ``nan_path_cost_<device>_b<batch>.json`` with the environment.
"""
import argparse
import importlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from . import results, shapes, timing


@contextmanager
def multi_group_off():
    """Launch configurations as before the NaN/Inf path (for this measurement only)."""
    fwd = importlib.import_module("kernels.conv_bn_act")  # (the package also has a function of that name)
    bwd = importlib.import_module("kernels.conv_grad")
    real = fwd.conv_config

    def without(*args, **kwargs):
        return dict(real(*args, **kwargs), MULTI_GROUP=False)
    fwd.conv_config = bwd.conv_config = without
    try:
        yield
    finally:
        fwd.conv_config = bwd.conv_config = real


def cases(batch: int, device: torch.device):
    import kernels
    from kernels.conv_grad import conv_dgrad
    for c in shapes.unique_convs(kind="conv3x3"):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, c.cin, c.h, c.w, device=device, generator=g).to(
            torch.bfloat16, memory_format=torch.channels_last)
        w = torch.randn(c.cout, c.cin_per_group, 3, 3, device=device, generator=g).to(torch.bfloat16)
        scale = torch.rand(c.cout, device=device, generator=g) + 0.5
        shift = torch.randn(c.cout, device=device, generator=g)
        dz = torch.randn(batch, c.cout, c.ho, c.wo, device=device, generator=g).to(
            torch.bfloat16, memory_format=torch.channels_last)
        yield c, "eval_forward", lambda: kernels.conv_bn_act(x, w, c.stride, 1, c.groups, out_scale=scale,
                                                             out_shift=shift, out_relu=True)
        yield c, "dgrad", lambda: conv_dgrad(dz, w, (c.h, c.w), c.stride, 1, c.groups)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default=str(results.RESULTS_DIR))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (the interpreter's timings mean nothing)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rows = []
    doc = dict(kind="nan_path_cost", environment=results.environment(device, argv), rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"nan_path_cost_{results.slug(doc['environment']['device_name'])}_b{args.batch}.json"
    for c, op, fn in cases(args.batch, device):
        medians = {"on": [], "off": []}
        for state in ("on", "off", "on", "off"):
            if state == "off":
                with multi_group_off():
                    medians[state].append(timing.measure(fn, device).median_ms)
            else:
                medians[state].append(timing.measure(fn, device).median_ms)
        on, off = (sum(medians[s]) / 2 for s in ("on", "off"))
        rows.append(dict(layer=c.label, op=op, batch=args.batch, dtype="bf16", median_ms_on=on, median_ms_off=off,
                         samples_on=medians["on"], samples_off=medians["off"], cost=on / off - 1))
        print(f"{c.label:40s} {op:13s} on {on * 1e3:8.1f} us  off {off * 1e3:8.1f} us  cost {on / off - 1:+.1%}",
              flush=True)
        path.write_text(json.dumps(doc, indent=1))  # after every row: a cut run keeps what it measured
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
