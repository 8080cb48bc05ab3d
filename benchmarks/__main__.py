"""``python -m benchmarks``: the headline table without pytest.

Times ResNet-50/101 and ResNeXt-50/101 32x4d (training step and inference) in eager
PyTorch and on our kernels, prints the headline table and writes the results JSON +
Markdown (see benchmarks/README.md).  On a machine without CUDA it times PyTorch on the
CPU at reduced size and says so; ``--tiny`` runs every case once at tiny size.
"""
import argparse
import sys

from . import cases, config, results
from .ceilings import measure_ceilings
from .progress import Progress


def _csv(kind):
    def parse(text):
        return tuple(kind(x) for x in text.split(",") if x.strip())
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Print (and save) the headline table: per-batch time of ResNet and ResNeXt in eager "
                    "PyTorch and on our Triton kernels, with the ResNeXt/ResNet ratio next to the paper's 1.36. "
                    "For the kernel and block levels use `pytest benchmarks --benchmark`.")
    ap.add_argument("--models", type=_csv(str), default=None,
                    help=f"comma-separated models (default: all of {','.join(config.FULL.models)})")
    ap.add_argument("--tasks", type=_csv(str), default=cases.MODEL_TASKS, help="train,inference (default: both)")
    ap.add_argument("--batch", type=_csv(int), default=None,
                    help="comma-separated batch sizes (default: 32,128 on a GPU; 2 on the CPU)")
    ap.add_argument("--image", type=int, default=None, help="input side (default: 224 on a GPU, 112 on the CPU)")
    ap.add_argument("--providers", type=_csv(str), default=("eager", "ours"),
                    help=f"comma-separated, from {','.join(config.PROVIDERS)} (default: eager,ours; 'all' for all)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--tiny", action="store_true",
                    help="every case once at tiny size (a check of the harness, as `pytest benchmarks` does)")
    ap.add_argument("--out", default=None, help="directory for the results files (default: benchmarks/results/...)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no results file")
    args = ap.parse_args(argv)
    if args.providers == ("all",):
        args.providers = config.PROVIDERS
    bad = sorted(set(args.providers) - set(config.PROVIDERS))
    if bad:
        ap.error(f"unknown provider(s) {bad}; choose from {', '.join(config.PROVIDERS)}")
    bad = sorted(set(args.tasks) - set(cases.MODEL_TASKS))
    if bad:
        ap.error(f"unknown task(s) {bad}; choose from {', '.join(cases.MODEL_TASKS)}")
    known = set(config.FULL.models) | {cases.MINI}
    bad = sorted(set(args.models or ()) - known)
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {', '.join(sorted(known))}")
    return args


def main(argv=None) -> int:
    return config.run_cli(parse_args(argv), _run, argv)


def _run(args, ctx, argv) -> int:
    if ctx.cuda:
        import torch
        torch.backends.cudnn.benchmark = True
    for line in config.header_lines(ctx):
        print(line)
    models = args.models or tuple(m for m in ctx.profile.models if m != cases.MINI)
    if ctx.ours_runs == "interpreter" and "ours" in args.providers and cases.MINI not in models:
        models = models + (cases.MINI,)  # the interpreter checks our kernels on the mini model
    case_list = cases.model_cases(ctx, args.providers, models=models, tasks=args.tasks,
                                  batches=args.batch, image=args.image)
    print(f"measuring the ceilings, then {len(case_list)} cases", flush=True)
    ctx.ceilings = measure_ceilings(ctx.device, smoke=ctx.smoke)
    argv_full = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    collector = results.Collector(ctx, argv=argv_full, out_dir=args.out,
                                  checkpoint_s=None if args.no_save else 30.0)
    progress = Progress(len(case_list))
    failures = []
    for case in case_list:
        progress.start(case.id)
        record = cases.run_case(case, ctx)
        err = record.pop("_exception", None)
        if err is not None:
            failures.append(f"{case.id}: {record['reason']}")
        collector.add(record)
        progress.advance(case.id)
    progress.close()
    print()
    print(collector.document()["headline"]["text"])
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return collector.close_cli(not args.no_save, len(failures))


if __name__ == "__main__":
    sys.exit(main())
