"""Compile the kernels for any GPU target without a GPU, and read their resource usage.

    python -m kernels._compile --target cuda:86 [--dtypes bf16,fp16,fp32] [--backward] [--json FILE]
    python -m kernels._compile --target hip:gfx942 --backward --sample representative  # one per kernel mode, dtype

compiles what the launchers would pick on that target (``kernels._targets``: cuda:80, 86, 89,
90, 100, 120, hip:gfx942) for the ResNet-50 / ResNeXt-50/101 shapes: the forward kernels and,
with ``--backward``, every backward kernel variant.  Each record gives kernel, mode, dtype,
the config, ``ok``, ``error`` (its first line), registers, ``local_bytes`` (spills),
``shared_bytes`` and the target's ``shared_limit``; the command exits non-zero if a variant
fails to compile or needs more shared memory than the target has (Triton checks that only at
launch, with ``OutOfResources``).

``triton.compile`` with a ``GPUTarget`` runs the whole pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin, or AMDGCN -> hsaco) on a machine with no GPU.  It cannot run in a process with
``TRITON_INTERPRET=1`` (the interpreter patches ``triton.language``): run this module in a
process of its own, as the tests do.  ``cuobjdump`` from Triton's wheel gives the NVIDIA
registers/spills and prints the SASS; the AMDGCN assembly gives gfx942's.
"""
import inspect
import os
import re
import subprocess
from typing import Dict, Iterable, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import _targets

HOPPER = GPUTarget("cuda", 90, 32)
_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def _jit_function(kernel):
    """Under TRITON_INTERPRET=1 ``@triton.jit`` gives an InterpretedFunction: rebuild the JITFunction."""
    if isinstance(kernel, triton.runtime.JITFunction):
        return kernel
    return triton.runtime.JITFunction(kernel.fn)


def compile_for(target: "_targets.Target", kernel, signature: Dict[str, str], constexprs: Dict[str, object],
                num_warps: int = 4, num_stages: int = 3, attrs=None):
    src = triton.compiler.ASTSource(fn=_jit_function(kernel), signature=signature, constexprs=constexprs,
                                    attrs=attrs or {})
    return triton.compile(src, target=target.gpu_target(), options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_for_hopper(kernel, signature: Dict[str, str], constexprs: Dict[str, object],
                       num_warps: int = 4, num_stages: int = 3, attrs=None):
    return compile_for(_targets.parse_target("cuda:90"), kernel, signature, constexprs, num_warps, num_stages, attrs)


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
    """Registers, local memory (spills) and shared memory of a compiled kernel (cuobjdump
    -res-usage; for AMD, the AMDGCN assembly's VGPR count and scratch size)."""
    import tempfile
    if "amdgcn" in compiled.asm:
        code = compiled.asm["amdgcn"]
        return {"registers": int(re.search(r"\.vgpr_count:\s*(\d+)", code).group(1)),
                "local_bytes": int(re.search(r"ScratchSize:\s*(\d+)", code).group(1)),
                "shared_bytes": int(compiled.metadata.shared)}
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
                         "gated_eval"), target=None) -> List[dict]:
    """The distinct compilations ``conv_bn_act`` performs for the given conv shapes, each
    specialised as the JIT would (``jit_specialization``).

    shapes: (N, Cin, H, W, Cout, groups, ksize, stride); mode "eval" = folded BN + residual +
    ReLU epilogue, "train" = prologue (BN + ReLU on load) + statistics, finalized in the launch
    (FINALIZE), "train_sync" = the same, the statistics left to a finalize (a process group's); "squeeze_*" = conv3 of
    an SE block (1x1 only): the per-image sums (SQUEEZE), with statistics or without an epilogue;
    "gated_*" = conv3 of a RegNetY block (1x1 only): the prologue's gate after its ReLU (IN_GATE),
    with statistics or with the eval epilogue (folded BN + residual + ReLU).  ``target``: the
    configurations the launchers pick there (default cuda:90).
    """
    from .conv_bn_act import conv_bn_act_fwd_kernel, finalize_constexprs, out_size
    from ._runtime import conv_config
    target = target or _targets.default_target()
    seen, launches = set(), []
    for (N, Cin, H, W, Cout, groups, ks, stride) in shapes:
        Ho, Wo = out_size(H, ks, stride, ks // 2), out_size(W, ks, stride, ks // 2)
        cfg = conv_config(N * Ho * Wo, Cout, Cin // groups, Cout // groups, getattr(torch, dtype), target)
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


def conv_backward_launches(shapes, dtype: str, target=None) -> List[dict]:
    """The distinct compilations of the convolution backward (``conv_dgrad_kernel``,
    ``conv_wgrad_kernel`` and the merged ``conv_grads_kernel`` in every mode the training
    backward launches), built by the launchers' own ``dgrad_launch`` / ``wgrad_launch`` /
    ``grads_launch`` for ``target``, for a channels_last model's weights."""
    from . import conv_grad as cg
    from .conv_bn_act import out_size
    target = target or _targets.default_target()
    ty = _PTR[dtype]
    tdtype = getattr(torch, dtype)
    grads_ptrs = {name: ty if name in ("dx_ptr", "dz_ptr", "w_ptr", "a_ptr", "z_ptr", "dx_add_ptr") else
                  "*i32" if name in ("counter_ptr", "pro_counter_ptr") else "*fp32"
                  for name in cg.conv_grads_kernel.arg_names if name.endswith("_ptr")}
    wgrad_ptrs = dict(part_ptr="*fp32", dz_ptr=ty, a_ptr=ty, in_scale_ptr="*fp32", in_shift_ptr="*fp32",
                      dw_ptr="*fp32", counter_ptr="*i32", in_gate_ptr="*fp32")
    seen, launches = set(), []

    def add(kernel, mode, ptrs, sizes, meta):
        meta = dict(meta)
        num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
        sig, const, attrs = jit_specialization(kernel, sizes, ptrs, meta)
        key = (mode, tuple(sorted(const.items())), num_warps, num_stages)  # one binary per config and mode
        if key not in seen:
            seen.add(key)
            launches.append(dict(kernel=kernel, signature=sig, constexprs=const, attrs=attrs, num_warps=num_warps,
                                 num_stages=num_stages, mode=mode))

    for (N, Cin, H, W, Cout, groups, ks, stride) in shapes:
        pad = ks // 2
        Ho, Wo = out_size(H, ks, stride, pad), out_size(W, ks, stride, pad)
        args = (N, Cin, H, W, Cout, Ho, Wo, ks, stride, pad, groups, tdtype)
        cin_g = Cin // groups
        w_strides = weight_operand_strides(Cout, cin_g, ks, dtype)
        dw_strides = (ks * ks * cin_g, 1, ks * cin_g, cin_g)  # a channels_last model's weight
        _, sizes, meta = cg.dgrad_launch(*args, w_strides=w_strides, target=target)
        add(cg.conv_dgrad_kernel, "dgrad", dict(dx_ptr=ty, dz_ptr=ty, w_ptr=ty), sizes, meta)
        for prologue in (False, True):  # the training backward recomputes the BN + ReLU prologue
            _, sizes, meta = cg.wgrad_launch(*args, in_affine=prologue, in_relu=prologue, dw_strides=dw_strides,
                                             target=target)
            add(cg.conv_wgrad_kernel, "wgrad_prologue" if prologue else "wgrad", wgrad_ptrs, sizes, meta)
            # both in one launch; with the prologue, also its backward (PRO_BWD); with a
            # batch-statistics BN after the convolution, its terms on load (STATS_DZ); a
            # block's conv1: the shortcut's gradient added to dx (DX_ADD)
            for pro_bwd, stats_dz, dx_add in (((False, False, False), (True, False, False), (True, True, False))
                                              if prologue else
                                              ((False, False, False), (False, True, False), (False, True, True))):
                _, sizes, meta, _ = cg.grads_launch(*args, in_affine=prologue, in_relu=prologue, w_strides=w_strides,
                                                    dw_strides=dw_strides, prologue_backward=pro_bwd,
                                                    stats_dz=stats_dz, stats_gamma=True, dx_add=dx_add, target=target)
                mode = "grads" + "_prologue" * prologue + "_pro_bwd" * pro_bwd + "_stats" * stats_dz \
                    + "_dx_add" * dx_add
                add(cg.conv_grads_kernel, mode, grads_ptrs, sizes, meta)
        if ks == 1 and stride == 1 and Cout >= 2 * Cin:  # conv3 of a RegNetY block: the prologue's gate (IN_GATE)
            _, sizes, meta, _ = cg.grads_launch(*args, in_affine=True, in_relu=True, w_strides=w_strides,
                                                dw_strides=dw_strides, in_gate=True, target=target)
            add(cg.conv_grads_kernel, "grads_gated", grads_ptrs, sizes, meta)
    if dtype == "float32":  # also the exact path, taken when TF32 is switched off
        launches += [dict(l, constexprs=dict(l["constexprs"], ALLOW_TF32=False), mode=l["mode"] + "_ieee")
                     for l in launches if l["mode"] in ("dgrad", "wgrad")][:2]
    return launches


# Every constexpr combination the BN backward formulas launch, at their heaviest
BN_BACKWARD_VARIANTS = {
    "bn_act": dict(HAS_DY=True, RELU_MODE=1, SCALE=True, STATS=False, WRITE_DZ=True, WRITE_DRES=True,
                   RES_SCALE=True, SUM_G=True, SUM_V=1, SUM_R=True),
    # a downsample block's final pass: sum g twice (bn3's and the downsample BN's shift)
    "bn_act_downsample": dict(HAS_DY=True, RELU_MODE=1, SCALE=True, STATS=False, WRITE_DZ=True, WRITE_DRES=True,
                              RES_SCALE=True, SUM_G=True, SUM_V=1, SUM_R=True, SUM_G_TWICE=True),
    "epilogue_stats": dict(HAS_DY=True, RELU_MODE=0, SCALE=False, STATS=True, STAT_DMV=True, STAT_DAFF=True,
                           STAT_GAMMA=True, WRITE_DZ=True, WRITE_DRES=False,
                           RES_SCALE=False, SUM_G=False, SUM_V=0, SUM_R=False),
    "epilogue_eval": dict(HAS_DY=True, RELU_MODE=1, SCALE=True, STATS=False, WRITE_DZ=True, WRITE_DRES=True,
                          RES_SCALE=False, SUM_G=True, SUM_V=1, SUM_R=False),
    "prologue": dict(HAS_DY=True, RELU_MODE=2, SCALE=True, STATS=False, WRITE_DZ=True, WRITE_DRES=False,
                     RES_SCALE=False, SUM_G=True, SUM_V=2, SUM_R=False),
    # squeeze-excite: the gated final pass with the gate's per-image gradient, conv3's stats pass with
    # the squeeze gradient added per image (kernels/squeeze_excite.py)
    "bn_act_gated": dict(HAS_DY=True, RELU_MODE=1, SCALE=True, STATS=False, WRITE_DZ=True, WRITE_DRES=True,
                         RES_SCALE=True, SUM_G=True, SUM_V=1, SUM_R=True, GATE=True, DGATE=True),
    "epilogue_stats_squeeze": dict(HAS_DY=True, RELU_MODE=0, SCALE=False, STATS=True, STAT_DMV=True,
                                   STAT_DAFF=True, STAT_GAMMA=True, WRITE_DZ=True, WRITE_DRES=False,
                                   RES_SCALE=False, SUM_G=False, SUM_V=0, SUM_R=False, IMG_ADD=True),
    # RegNetY's SE after conv2: conv3's gated prologue (the gate's gradient with the affine ReLU
    # mask), conv2's stats pass with the squeeze gradient added under the ReLU mask
    "prologue_gated": dict(HAS_DY=True, RELU_MODE=2, SCALE=True, STATS=False, WRITE_DZ=True, WRITE_DRES=False,
                           RES_SCALE=False, SUM_G=True, SUM_V=2, SUM_R=False, GATE=True, DGATE=True),
    "epilogue_stats_relu_squeeze": dict(HAS_DY=True, RELU_MODE=0, SCALE=False, STATS=True, STAT_DMV=True,
                                        STAT_DAFF=True, STAT_GAMMA=True, WRITE_DZ=True, WRITE_DRES=False,
                                        RES_SCALE=False, SUM_G=False, SUM_V=0, SUM_R=False, IMG_ADD=True,
                                        IMG_MASK=True),
}


def bn_backward_launches(dtype: str) -> List[dict]:
    """``bn_backward_kernel`` in every variant of ``BN_BACKWARD_VARIANTS``, with the
    configurations its launcher picks for ResNeXt channel counts at batch 64 (and a narrow layer)."""
    from ._runtime import INTERPRET
    from .bn_backward import bn_backward_kernel, launch_config
    assert not INTERPRET  # launch_config picks the interpreter's tiles there
    act = {"dz_ptr", "dres_ptr", "dy_ptr", "relu_src_ptr", "v_ptr", "r_ptr", "img_src_ptr", "gate_ptr"}
    configs = {(c["BLOCK_M"], c["BLOCK_C"], c["num_warps"]) for c in
               (launch_config(64 * hw * hw, C) for C, hw in ((64, 56), (128, 56), (256, 28), (2048, 7), (16, 8)))}
    launches = []
    for block_m, block_c, num_warps in sorted(configs):
        for mode, flags in BN_BACKWARD_VARIANTS.items():
            bm = max(16, block_m // 2) if flags.get("DGATE") else block_m  # image_launch_config: half the rows
            const = dict(dict(STAT_DMV=False, STAT_DAFF=False, STAT_GAMMA=False, GATE=False, DGATE=False,
                              IMG_ADD=False, IMG_MASK=False, SUM_G_TWICE=False), **flags, BLOCK_M=bm, BLOCK_C=block_c,
                         BLOCK_T=32, dy_stride_c=1)  # dy channels_last: stride 1, as the JIT
            sig = {n: "constexpr" if n in const else _PTR[dtype] if n in act
                   else "*i32" if n == "counter_ptr" else "*fp32" if n.endswith("_ptr")
                   else "fp32" if n in ("count", "eps") else "i32" for n in bn_backward_kernel.arg_names}
            launches.append(dict(kernel=bn_backward_kernel, signature=sig, constexprs=const, num_warps=num_warps,
                                 num_stages=3, mode=mode))
    return launches


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
          "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def all_launches(batches=(64, 256), dtypes=("bfloat16", "float16", "float32"), backward: bool = False,
                 target=None) -> List[dict]:
    """Every distinct compilation the launchers pick on ``target`` (default cuda:90) for the
    models' shapes at these batch sizes: forward kernels, and with ``backward`` the backward's."""
    target = target or _targets.default_target()
    launches = []
    shapes = [s for b in batches for s in model_conv_shapes(b)]
    for dtype in dtypes:
        launches += [dict(l, dtype=dtype) for l in conv_launches(shapes, dtype, target=target)]
        launches += [dict(l, dtype=dtype) for l in elementwise_launches(dtype)]
        if backward:
            launches += [dict(l, dtype=dtype) for l in conv_backward_launches(shapes, dtype, target=target)]
            launches += [dict(l, dtype=dtype) for l in bn_backward_launches(dtype)]
    return launches


def _config_size(launch: dict) -> int:
    """How heavy a variant's configuration is: tile elements times pipeline stages."""
    c = launch["constexprs"]
    tile = 1
    for name, value in c.items():
        if name.startswith(("BLOCK", "D_BLOCK", "W_BLOCK")) and isinstance(value, int):
            tile *= value
    return tile * launch["num_stages"] * launch["num_warps"]


def representative(launches: List[dict]) -> List[dict]:
    """One variant per kernel, mode and dtype (the heaviest configuration), and per kind of
    channel block of the convolutions (``MULTI_GROUP``: grouped tiles that span several groups,
    the formulation that fails on some (target, Triton) pairs): what CI compiles per target."""
    best = {}
    for l in launches:
        name = l["kernel"].fn.__name__ if hasattr(l["kernel"], "fn") else str(l["kernel"])
        key = (name, l["mode"], l["dtype"], bool(l["constexprs"].get("MULTI_GROUP", 0)))
        if key not in best or _config_size(l) > _config_size(best[key]):
            best[key] = l
    return list(best.values())


def ci_sample(launches: List[dict]) -> List[dict]:
    """CI's sample of a target (``--sample ci``): in bf16 and fp32, the heaviest configuration
    of each convolution kernel (forward, dgrad, wgrad, both gradients), for grouped tiles
    spanning several groups and for the others; the elementwise kernels once, in bf16 (their
    tiles do not depend on the target).  fp16 is left to the full matrix: it compiles as bf16
    (same tiles, same MMA shapes).  20 variants: seven targets fit CI's time."""
    picked = []
    for l in representative(launches):
        name = l["kernel"].fn.__name__
        if l["mode"].endswith("_ieee") or l["dtype"] == "float16":  # (exact fp32: FMA by design)
            continue
        if name in ("conv_bn_act_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel", "conv_grads_kernel") \
                or l["dtype"] == "bfloat16":
            picked.append(l)
    best = {}
    for l in picked:
        key = (l["kernel"].fn.__name__, l["dtype"], bool(l["constexprs"].get("MULTI_GROUP", 0)))
        if key not in best or _config_size(l) > _config_size(best[key]):
            best[key] = l
    return list(best.values())


def _resolve(name: str):
    import importlib
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


# a 16-byte cp.async, or a 16-byte global load
_PTX_16_BYTE_LOAD = (r"cp\.async\.(cg|ca)\.shared\.global(\.L2::\w+)? \[[^]]*\], \[[^]]*\], (16|0x10)\b|"
                     r"ld\.global(\.\w+)*\.v4\.(b32|f32|u32)|ld\.global(\.\w+)*\.v2\.(b64|u64)")


def _compile_one(job) -> dict:
    from ._runtime import first_error_line
    target_key, launch = job
    target = _targets.parse_target(target_key)
    kernel = _resolve(launch["kernel"])
    const = launch["constexprs"]
    config = {k: v for k, v in const.items()
              if k.startswith(("BLOCK", "D_BLOCK", "W_BLOCK", "KSIZE", "MULTI")) and not isinstance(v, bool)
              or k == "MULTI_GROUP"}
    config.update(num_warps=launch["num_warps"], num_stages=launch["num_stages"])
    row = dict(target=target.key, triton=triton.__version__, kernel=kernel.fn.__name__, mode=launch["mode"],
               dtype=launch["dtype"], config=config, ok=False, error=None, registers=None, local_bytes=None,
               shared_bytes=None, shared_limit=target.shared_per_block)
    try:
        c = compile_for(target, kernel, launch["signature"], const, launch["num_warps"], launch["num_stages"],
                        launch.get("attrs"))
        row.update(resource_usage(c))
    except Exception as err:  # a record, not a crash: the table shows every failure
        row["error"] = first_error_line(err)
        return row
    row["ok"] = row["shared_bytes"] <= target.shared_per_block
    if not row["ok"]:
        row["error"] = f"shared memory {row['shared_bytes']} B > {target.shared_per_block} B per block"
    if target.backend == "cuda":  # from the PTX (the SASS, ``sass(c)``, costs a disassembly per variant)
        code = c.asm["ptx"]
        row["tensor_cores"] = ("tcgen05" if "tcgen05.mma" in code else "wgmma" if "wgmma.mma_async" in code
                               else "mma.sync" if re.search(r"\bmma\.sync", code) else "none")
        row["vector_loads"] = bool(re.search(_PTX_16_BYTE_LOAD, code))
    else:
        code = c.asm["amdgcn"]
        row["tensor_cores"] = "MFMA" if "v_mfma" in code else "none"
        row["vector_loads"] = "global_load_dwordx4" in code or "buffer_load_dwordx4" in code
    return row


def summarize(rows: List[dict]) -> str:
    ok = [r for r in rows if r["ok"]]
    compiled = [r for r in rows if r["registers"] is not None]
    if not compiled:
        return f"{len(ok)}/{len(rows)} ok"
    return (f"{len(ok)}/{len(rows)} ok; max registers {max(r['registers'] for r in compiled)}, "
            f"max spill {max(r['local_bytes'] for r in compiled)} B, "
            f"max shared {max(r['shared_bytes'] for r in compiled)} B of {rows[0]['shared_limit']} B")


def main(argv=None) -> int:
    import argparse
    import json
    from concurrent.futures import ProcessPoolExecutor
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter cannot compile")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=_targets.DEFAULT_KEY, help=f"one of {', '.join(_targets.TARGET_KEYS)}")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--backward", action="store_true", help="also every backward kernel variant")
    p.add_argument("--sample", choices=("all", "representative", "ci"), default="all",
                   help="all variants; one per kernel, mode and dtype (and grouped-tile kind); or CI's sample "
                        "(one per kernel and dtype)")
    p.add_argument("--json", help="write the records here")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quiet", action="store_true", help="only the summary and the failures")
    args = p.parse_args(argv)
    try:
        target = _targets.parse_target(args.target)
        dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    except (KeyError, ValueError) as err:
        p.error(str(err))
    launches = all_launches(tuple(int(b) for b in args.batches.split(",")), dtypes, args.backward, target)
    if args.sample != "all":
        launches = (representative if args.sample == "representative" else ci_sample)(launches)
    jobs = []
    for launch in launches:  # pickled to the workers by name
        fn = launch["kernel"]
        jobs.append((target.key, dict(launch, kernel=f"{fn.fn.__module__}.{fn.fn.__name__}")))
    print(f"compiling {len(jobs)} kernel variants for {target} with {args.jobs} processes", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(_compile_one, jobs))
    cols = ["kernel", "mode", "dtype", "ok", "registers", "local_bytes", "shared_bytes", "tensor_cores", "config"]
    for r in rows:
        if not args.quiet or not r["ok"]:
            print(" ".join(str(r.get(c, "")) for c in cols) + ("" if r["ok"] else f"  ERROR {r['error']}"))
    print(f"{target.key} Triton {triton.__version__}: {summarize(rows)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
