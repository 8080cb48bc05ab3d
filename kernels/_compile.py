"""Compile the kernels for Hopper without a GPU, and read their resource usage.

    python -m kernels._compile [--json FILE]     # every kernel and config for the ResNeXt/ResNet shapes

``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` runs the whole pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin) on a machine with no GPU.  It cannot run in a process with
``TRITON_INTERPRET=1`` (the interpreter patches ``triton.language``): run this module in a
process of its own, as the tests do.  CI uses it to catch kernels that
only work in the interpreter; the profiling tools use it to report registers, spills and
shared memory; ``cuobjdump`` from Triton's wheel prints the SASS.
"""
import inspect
import os
import re
import subprocess
from typing import Dict, Iterable, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget

HOPPER = GPUTarget("cuda", 90, 32)
_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def _jit_function(kernel):
    """Under TRITON_INTERPRET=1 ``@triton.jit`` gives an InterpretedFunction: rebuild the JITFunction."""
    if isinstance(kernel, triton.runtime.JITFunction):
        return kernel
    return triton.runtime.JITFunction(kernel.fn)


def compile_for_hopper(kernel, signature: Dict[str, str], constexprs: Dict[str, object],
                       num_warps: int = 4, num_stages: int = 3, attrs=None):
    src = triton.compiler.ASTSource(fn=_jit_function(kernel), signature=signature, constexprs=constexprs,
                                    attrs=attrs or {})
    return triton.compile(src, target=HOPPER, options=dict(num_warps=num_warps, num_stages=num_stages))


def jit_specialization(kernel, ints: Dict[str, int], pointer_types: Dict[str, str], constexprs: Dict[str, object]):
    """(signature, constexprs, attrs) as Triton's JIT specialises this launch: every pointer
    16-byte aligned (PyTorch's allocations are), an int equal to 1 becomes a constant and a
    multiple of 16 gets that divisibility, except the kernel's ``do_not_specialize`` ones."""
    kernel = _jit_function(kernel)
    signature, constexprs, attrs = {}, dict(constexprs), {}
    defaults = {n: p.default for n, p in inspect.signature(kernel.fn).parameters.items()}
    for i, param in enumerate(kernel.params):
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif param.is_constexpr and name not in ints:  # a constexpr left out: its default
            signature[name] = "constexpr"
            constexprs[name] = defaults[name]
        elif isinstance(ints.get(name, defaults[name]), float):  # a float argument, or a float default left out
            signature[name] = "fp32"
        elif ints[name] == 1 and not param.do_not_specialize:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _nvidia_bin(tool: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def resource_usage(compiled) -> Dict[str, int]:
    """Registers, local memory (spills) and shared memory of a compiled kernel (cuobjdump -res-usage)."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = {"registers": int(re.search(r"REG:(\d+)", out).group(1)),
             "local_bytes": int(re.search(r"STACK:(\d+)", out).group(1)),
             "shared_bytes": int(compiled.metadata.shared)}
    return usage


def sass(compiled) -> str:
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([_nvidia_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def conv_launches(shapes: Iterable[Tuple[int, int, int, int, int, int, int, int]], dtype: str,
                  modes=("eval", "train", "train_sync", "squeeze_train", "squeeze_eval", "gated_train",
                         "gated_eval")) -> List[dict]:
    """The distinct compilations ``conv_bn_act`` performs for the given conv shapes, each
    specialised as the JIT would (``jit_specialization``).

    shapes: (N, Cin, H, W, Cout, groups, ksize, stride); mode "eval" = folded BN + residual +
    ReLU epilogue, "train" = prologue (BN + ReLU on load) + statistics, finalized in the launch
    (FINALIZE), "train_sync" = the same, the statistics left to a finalize (a process group's); "squeeze_*" = conv3 of
    an SE block (1x1 only): the per-image sums (SQUEEZE), with statistics or without an epilogue;
    "gated_*" = conv3 of a RegNetY block (1x1 only): the prologue's gate after its ReLU (IN_GATE),
    with statistics or with the eval epilogue (folded BN + residual + ReLU).
    """
    from .conv_bn_act import conv_bn_act_fwd_kernel, finalize_constexprs, out_size
    from ._runtime import conv_config
    seen, launches = set(), []
    for (N, Cin, H, W, Cout, groups, ks, stride) in shapes:
        Ho, Wo = out_size(H, ks, stride, ks // 2), out_size(W, ks, stride, ks // 2)
        cfg = conv_config(N * Ho * Wo, Cout, Cin // groups, Cout // groups, getattr(torch, dtype))
        ints = dict(N=N, H=H, W=W, Cin=Cin, Ho=Ho, Wo=Wo, Cout=Cout, CIN_G=Cin // groups, COUT_G=Cout // groups,
                    stride=stride, padding=ks // 2)
        ints.update(zip(("w_stride_tap", "w_stride_ci", "w_stride_co"),
                        weight_operand_strides(Cout, Cin // groups, ks, dtype)))
        for mode in modes:
            squeeze, gated = mode.startswith("squeeze"), mode.startswith("gated")
            if (squeeze or gated) and (ks != 1 or stride != 1 or Cout < 2 * Cin):  # conv3 of a bottleneck
                continue
            train = mode in ("train", "train_sync", "squeeze_train", "gated_train")
            flags = dict(KSIZE=ks, IN_AFFINE=train or gated, IN_RELU=train or gated,
                         OUT_AFFINE=not train and not squeeze, HAS_RESIDUAL=not train and not squeeze and ks == 1,
                         OUT_RELU=not train and not squeeze, STATS=train, ALLOW_TF32=dtype == "float32",
                         SQUEEZE=squeeze, IN_GATE=gated)
            if train and mode != "train_sync":  # (a BN with running statistics, the momentum rule)
                flags.update(finalize_constexprs((True, True, False, True), cfg["BLOCK_N"]))
            const = dict(flags, **{k: v for k, v in cfg.items() if k.isupper()})
            pointers = {name: (_PTR[dtype] if name in ("out_ptr", "x_ptr", "w_ptr", "res_ptr") else
                               "*i32" if name == "counter_ptr" else "*i64" if name == "nbt_ptr" else "*fp32")
                        for name in conv_bn_act_fwd_kernel.arg_names if name.endswith("_ptr")}
            ints["sq_slots"] = min(N, (cfg["BLOCK_M"] - 1) // (Ho * Wo) + 2)
            sig, const, attrs = jit_specialization(conv_bn_act_fwd_kernel, ints, pointers, const)
            key = (mode, tuple(sorted(sig.items())), tuple(sorted(const.items())), tuple(sorted(attrs)),
                   cfg["num_warps"], cfg["num_stages"])
            if key in seen:
                continue
            seen.add(key)
            launches.append(dict(kernel=conv_bn_act_fwd_kernel, signature=sig, constexprs=const, attrs=attrs,
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], mode=mode))
    return launches


def weight_operand_strides(cout: int, cin_g: int, ksize: int, dtype: str) -> Tuple[int, int, int]:
    """(tap, ci, co) strides of the weight the conv kernels read for a channels_last model:
    fp32 reads the weight as stored ([Cout, k, k, Cin_g] memory), a cast reads the pack."""
    if dtype == "float32":
        return cin_g, 1, ksize * ksize * cin_g
    return cin_g * cout, cout, 1


def model_conv_shapes(batch: int = 64, image: int = 224):
    """(N, Cin, H, W, Cout, groups, ksize, stride) of every bottleneck conv of ResNet-50 and
    ResNeXt-50/101 32x4d (ResNeXt-101 repeats ResNeXt-50's shapes)."""
    shapes = set()
    for groups, width_per_group in ((1, 64), (32, 4)):
        inplanes, hw = 64, image // 4
        for i, planes in enumerate((64, 128, 256, 512)):
            width = planes * width_per_group // 64 * groups
            stride = 1 if i == 0 else 2
            out = planes * 4
            shapes.add((batch, inplanes, hw, hw, width, 1, 1, 1))  # conv1 of the first block
            shapes.add((batch, out, hw // stride, hw // stride, width, 1, 1, 1))  # conv1 of the others
            shapes.add((batch, width, hw, hw, width, groups, 3, stride))  # grouped 3x3, strided first
            shapes.add((batch, width, hw // stride, hw // stride, width, groups, 3, 1))
            shapes.add((batch, width, hw // stride, hw // stride, out, 1, 1, 1))  # conv3
            shapes.add((batch, inplanes, hw, hw, out, 1, 1, stride))  # downsample
            inplanes, hw = out, hw // stride
    return sorted(shapes)


def elementwise_launches(dtype: str) -> List[dict]:
    from .batchnorm import bn_act_kernel, bn_finalize_kernel
    from .conv_bn_act import squeeze_sum_kernel
    from .squeeze_excite import relu_squeeze_config, relu_squeeze_kernel, squeeze_backward_kernel
    launches = []
    for res_affine, gate in ((False, False), (True, False), (False, True), (True, True)):
        const = dict(HAS_RESIDUAL=True, RES_AFFINE=res_affine, RELU=True, BLOCK_M=64, BLOCK_C=64, GATE=gate)
        sig = {n: ("constexpr" if n in const else _PTR[dtype] if n in ("out_ptr", "z_ptr", "res_ptr", "gate_ptr")
                   else "*fp32" if n.endswith("_ptr") else "i32") for n in bn_act_kernel.arg_names}
        launches.append(dict(kernel=bn_act_kernel, signature=sig, constexprs=const, num_warps=4, num_stages=3,
                             mode="bn_act_gated" if gate else "bn_act"))
    const = dict(BLOCK_C=64)
    sig = {n: "constexpr" if n in const else "*fp32" if n.endswith("_ptr") else "i32"
           for n in squeeze_sum_kernel.arg_names}
    launches.append(dict(kernel=squeeze_sum_kernel, signature=sig, constexprs=const, num_warps=4, num_stages=3,
                         mode="squeeze_sum"))
    for has_q in (False, True):  # with Q: the after-ReLU squeeze of a RegNetY block
        const = dict(HAS_DSCALE=True, HAS_DSHIFT=True, BLOCK_C=64, HAS_Q=has_q)
        sig = {n: "constexpr" if n in const else "*fp32" if n.endswith("_ptr") else "fp32" if n == "inv_hw" else "i32"
               for n in squeeze_backward_kernel.arg_names}
        launches.append(dict(kernel=squeeze_backward_kernel, signature=sig, constexprs=const, num_warps=4,
                             num_stages=3, mode="squeeze_backward_relu" if has_q else "squeeze_backward"))
    for hw, c in ((3136, 128), (49, 1024), (196, 48)):  # the configurations of a few RegNetY/ResNeXt layers
        cfg = relu_squeeze_config(hw, c)
        const = dict(BLOCK_HW=cfg["BLOCK_HW"], BLOCK_C=cfg["BLOCK_C"])
        sig = {n: "constexpr" if n in const else _PTR[dtype] if n == "z_ptr" else "*i32" if n == "counter_ptr"
               else "*fp32" if n.endswith("_ptr") else "i32" for n in relu_squeeze_kernel.arg_names}
        launches.append(dict(kernel=relu_squeeze_kernel, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                             num_stages=3, mode="relu_squeeze"))
    # the two launches of a cross-rank merge (kernels.sync_bn): this rank's row, then the ranks' rows
    for update, sync in ((False, None), (True, None), (False, "MERGED_OUT"), (True, "ROW_COUNTS")):
        const = dict(AFFINE=update, UPDATE=update, CUMULATIVE=False, COUNT=update, BLOCK_T=32, BLOCK_C=64,
                     ROW_COUNTS=sync == "ROW_COUNTS", MERGED_OUT=sync == "MERGED_OUT")
        sig = {n: ("constexpr" if n in const else "*i64" if n == "nbt_ptr"
                   else _PTR[dtype] if n in ("gamma_ptr", "beta_ptr", "run_mean_ptr", "run_var_ptr")
                   else "*fp32" if n.endswith("_ptr") else "fp32" if n in ("momentum", "eps") else "i32")
               for n in bn_finalize_kernel.arg_names}
        launches.append(dict(kernel=bn_finalize_kernel, signature=sig, constexprs=const, num_warps=4, num_stages=3,
                             mode="bn_finalize" + (f"_{sync.lower()}" if sync else "")))
    return launches


def all_launches(batches=(64, 256)) -> List[dict]:
    launches = []
    for dtype in ("bfloat16", "float16", "float32"):
        shapes = [s for b in batches for s in model_conv_shapes(b)]
        launches += [dict(l, dtype=dtype) for l in conv_launches(shapes, dtype)]
        launches += [dict(l, dtype=dtype) for l in elementwise_launches(dtype)]
    return launches


def _resolve(name: str):
    import importlib
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


def _compile_one(launch: dict) -> dict:
    launch = dict(launch, kernel=_resolve(launch["kernel"]))
    c = compile_for_hopper(launch["kernel"], launch["signature"], launch["constexprs"], launch["num_warps"],
                           launch["num_stages"], launch.get("attrs"))
    code = sass(c)
    row = dict(kernel=launch["kernel"].fn.__name__, mode=launch["mode"], dtype=launch["dtype"],
               num_warps=launch["num_warps"], num_stages=launch["num_stages"],
               **{k: v for k, v in launch["constexprs"].items() if k.startswith(("BLOCK", "KSIZE", "MULTI"))},
               **resource_usage(c), tensor_cores=("HGMMA" if "HGMMA" in code else "HMMA" if "HMMA" in code
                                                  else "none"),
               vector_loads=bool(re.search(r"LDG(STS)?\.E(\.BYPASS)?\.128", code)))
    return row


def main(argv=None) -> int:
    import argparse
    import json
    from concurrent.futures import ProcessPoolExecutor
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter cannot compile")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the table here")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    launches = all_launches(tuple(int(b) for b in args.batches.split(",")))
    for launch in launches:  # pickled to the workers by name
        fn = launch["kernel"]
        launch["kernel"] = f"{fn.fn.__module__}.{fn.fn.__name__}" if hasattr(fn, "fn") else fn
    print(f"compiling {len(launches)} kernel variants for sm_90 with {args.jobs} processes", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(_compile_one, launches))
    cols = ["kernel", "mode", "dtype", "KSIZE", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "MULTI_GROUP", "num_warps",
            "registers", "local_bytes", "shared_bytes", "tensor_cores", "vector_loads"]
    print(" ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" ".join(f"{str(r.get(c, '')):>12}" for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
