"""One-pass BatchNorm / ReLU backward over NHWC rows: the elementwise half of every backward.

The backward of ``conv_bn_act`` (epilogue and prologue side) and of ``bn_act`` is, per
element of an [M, C] NHWC matrix (M = N*H*W rows, channels contiguous), the same few
steps, which in plain PyTorch are one full pass over the activation each::

    g     = dy                               (0 where no gradient flows in)
    g     = 0 where relu_src <= 0            (ReLU backward; relu_src = the op output y,
                                              or the recomputed pre-activation x*s + b)
    dz    = g * scale[c]                     (BN scale; optional)
          + dmean[c]/M + dvar[c]*2/M*(z - mean[c])   (batch-statistics terms; optional)
    dres  = g * res_scale[c]  or  g          (residual-branch gradient; optional)
    sums  = sum_m g,  sum_m g*v,  sum_m g*r  (per channel: BN shift/scale gradients)

``bn_backward_kernel`` does them all in a single read of its inputs and a single write of
its outputs.  The per-channel sums are reduced in fp32: each program owns a fixed run of
rows, accumulates in registers and writes one partial row to a ``[sums, programs, C]``
buffer; the last run of each channel block to finish (elected by an integer counter,
``_triton_helpers.last_arrival``) sums those rows in a fixed order, in the same launch.
No float atomics: bit-identical results run to run.  The program count depends only on (M, C), not on the device, so two GPUs
give the same bits too.

``bn_backward`` is the entry point; it goes through the ``resnext::bn_backward`` custom op
so that ``torch.compile`` traces the surrounding backward formulas with fake tensors.
It runs the Triton kernel (or, where that kernel failed to compile or launch, its PyTorch
reference, ``reference.bn_backward_reference``): callers keep their plain PyTorch formulas for
float64 and plain CPU tensors (see ``conv_bn_act._backward`` and ``batchnorm._bn_act_backward``).
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl


from . import _runtime, reference
from ._runtime import arrival_counters, cdiv, eager_or_op, INTERPRET, _pow2_clamp, rows_config
from ._triton_helpers import bn_stats_backward, last_arrival

Tensor = torch.Tensor

# Programs per launch (row runs x channel blocks) to aim for: a few waves on an H100's
# 132 SMs, and few enough that the partial-sum buffer stays a small fraction of the
# activation.  A constant, not the device's SM count: the reduction order (hence the
# bits of the sums) must not depend on which GPU runs it.
TARGET_PROGRAMS = 1024

# relu_mode values
RELU_NONE, RELU_OUTPUT, RELU_AFFINE = 0, 1, 2


@triton.jit(do_not_specialize=["M", "rows_per_prog"])  # batch-dependent sizes: see _runtime
def bn_backward_kernel(
    dz_ptr,  # [M, C] out (WRITE_DZ), its own dtype: g*scale (+ statistics terms)
    dres_ptr,  # [M, C] out (WRITE_DRES), its own dtype: g*res_scale, or g
    part_ptr,  # [3, T, C] fp32 out: this program's sum(g), sum(g*v), sum(g*r) (SUM_G, SUM_V, SUM_R)
    #            (GATE and SUM_G: [4, T, C], g gated in the first two, un-gated in the others)
    dy_ptr,  # [M, C] incoming gradient (HAS_DY; without it g = 0)
    relu_src_ptr,  # [M, C]: the op output y (RELU_MODE 1) or the pre-BN input x (RELU_MODE 2)
    relu_scale_ptr, relu_shift_ptr,  # [C] fp32 (RELU_MODE 2): the mask is x*scale + shift > 0
    v_ptr,  # [M, C] (SUM_V == 1, or STATS: the z of the statistics terms)
    r_ptr,  # [M, C] (SUM_R)
    scale_ptr,  # [C] fp32 (SCALE)
    res_scale_ptr,  # [C] fp32 (RES_SCALE)
    mean_ptr, var_ptr,  # [C] fp32 (STATS): batch mean and biased variance
    dmean_ptr, dvar_ptr,  # [C] fp32 (STAT_DMV): the loss's gradients w.r.t. mean and var
    dscale_ptr, dshift_ptr,  # [C] fp32 (STAT_DAFF): ... w.r.t. the BN's scale and shift
    gamma_ptr,  # [C] (STAT_GAMMA): the BN weight
    dparam_ptr,  # [2, C] fp32 out (STAT_DAFF): gradients of gamma and beta
    M, C,  # rows, channels
    rows_per_prog,  # rows one program reduces: a multiple of BLOCK_M
    count,  # fp32 (STATS): elements per channel the statistics were taken over (M)
    eps,  # fp32 (STAT_DAFF): the BN's eps
    HAS_DY: tl.constexpr,
    RELU_MODE: tl.constexpr,  # 0 none, 1 from the output y, 2 recomputed from x*scale + shift
    SCALE: tl.constexpr, STATS: tl.constexpr,
    STAT_DMV: tl.constexpr, STAT_DAFF: tl.constexpr, STAT_GAMMA: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    WRITE_DRES: tl.constexpr, RES_SCALE: tl.constexpr,
    SUM_G: tl.constexpr,
    SUM_V: tl.constexpr,  # 0 none, 1 v from v_ptr, 2 v = x already loaded for the mask (RELU_MODE 2)
    SUM_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    sums_ptr,  # [3, C] fp32 out (any SUM_*): sum(g), sum(g*v), sum(g*r) over all rows (zeros if not asked)
    counter_ptr,  # int32 [channel blocks], zero (_runtime.arrival_counters): row runs arrived
    dy_stride_m, dy_stride_c,  # dy's element strides as an [M, C] matrix (0, 0: a broadcast scalar)
    BLOCK_T: tl.constexpr = 32,  # partial rows summed at a time by the last run
    gate_ptr=None,  # [N, C] any float dtype, strides gate_sn, gate_sc (GATE): multiplies the BN branch
    gate_sn=0, gate_sc=0,
    shift_ptr=None,  # [C] fp32 (DGATE): the BN shift, u = v*scale + shift
    dgate_ptr=None,  # [T, C] fp32 out (DGATE): per-program sum of g*u (programs image-aligned)
    img_ptr=None,  # [N, C] fp32 (IMG_ADD): added to dy per (image, channel)
    HW=1,  # rows per image (GATE, DGATE, IMG_ADD)
    progs_per_image=1,  # (DGATE) programs per image: program t covers part of image t // progs_per_image
    GATE: tl.constexpr = False, DGATE: tl.constexpr = False, IMG_ADD: tl.constexpr = False,
    img_src_ptr=None,  # [M, C] (IMG_MASK, without STATS; with STATS the z of v_ptr): the mask's source
    img_scale_ptr=None, img_shift_ptr=None,  # [C] fp32 (IMG_MASK): the image add only where src*scale + shift > 0
    IMG_MASK: tl.constexpr = False,
    SUM_G_TWICE: tl.constexpr = False,  # (SUM_G, no GATE) sum(g) in the fourth slot too: a second gradient tensor
):
    pid_t = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    T = tl.num_programs(0)

    # Per-channel vectors: loaded once per program, reused for every row block.
    if SCALE:
        s = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    if RELU_MODE == 2:
        relu_s = tl.load(relu_scale_ptr + offs_c, mask=c_ok, other=0.0)
        relu_b = tl.load(relu_shift_ptr + offs_c, mask=c_ok, other=0.0)
    if RES_SCALE:
        res_s = tl.load(res_scale_ptr + offs_c, mask=c_ok, other=0.0)
    if IMG_MASK:
        img_s = tl.load(img_scale_ptr + offs_c, mask=c_ok, other=0.0)
        img_b = tl.load(img_shift_ptr + offs_c, mask=c_ok, other=0.0)
    if STATS:
        mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
        d_mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
        d_var = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if STAT_DMV:
            d_mean += tl.load(dmean_ptr + offs_c, mask=c_ok, other=0.0)
            d_var += tl.load(dvar_ptr + offs_c, mask=c_ok, other=0.0)
        if STAT_DAFF:  # the finalize's backward, on [C] vectors here rather than in a launch of its own
            dm_aff, dv_aff, d_gamma, d_beta = bn_stats_backward(offs_c, c_ok, mean, var_ptr, dscale_ptr, dshift_ptr,
                                                                gamma_ptr, eps, STAT_GAMMA, BLOCK_C)
            d_mean += dm_aff
            d_var += dv_aff
            if pid_t == 0:  # one program per channel block writes gamma's and beta's gradients
                tl.store(dparam_ptr + offs_c, d_gamma, mask=c_ok)
                tl.store(dparam_ptr + C + offs_c, d_beta, mask=c_ok)
        dmean_term = d_mean / count
        dvar_coef = d_var * (2.0 / count)

    # 2-D accumulators, reduced over rows once at the end: no cross-thread reduction per
    # row block, and each register sums only rows_per_prog / BLOCK_M terms.
    acc_g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_gv = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_gr = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    if DGATE:  # per-image sums: a program's rows lie in one image
        img0 = pid_t // progs_per_image
        row_start = img0 * HW + (pid_t - img0 * progs_per_image) * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, (img0 + 1) * HW)
    else:
        row_start = pid_t * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, M)
    acc_du = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_g_res = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)  # (GATE and SUM_G) sum of the un-gated g
    if DGATE:
        b_shift = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ok = (offs_m < row_end)[:, None] & c_ok[None, :]
        off = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]  # int64: M*C may exceed 2**31
        if HAS_DY:
            dy_off = offs_m.to(tl.int64)[:, None] * dy_stride_m + offs_c[None, :] * dy_stride_c
            g = tl.load(dy_ptr + dy_off, mask=ok, other=0.0).to(tl.float32)
        else:
            g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        if STATS and IMG_MASK:  # z, loaded here for the mask below (else later: fewer live registers)
            v = tl.load(v_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if IMG_ADD:
            img_g = tl.load(img_ptr + (offs_m // HW)[:, None] * C + offs_c[None, :], mask=ok, other=0.0)
            if IMG_MASK:
                # The gradient of a squeeze over relu(src*scale + shift) (a RegNetY SE after conv2):
                # the ReLU mask of the activation as the forward rounded it; NaN passes, as in
                # RELU_MODE 2.  With STATS, src is the z already loaded.
                if STATS:
                    src = v
                else:
                    src = tl.load(img_src_ptr + off, mask=ok, other=0.0).to(tl.float32)
                pre = (src * img_s[None, :] + img_b[None, :]).to(img_src_ptr.dtype.element_ty)
                img_g = tl.where(pre <= 0.0, 0.0, img_g)
            g += img_g
        # ReLU backward as torch's threshold_backward: 0 where the ReLU output is <= 0, else
        # g.  A NaN activation passes g (NaN <= 0 is false), a NaN g is zeroed where masked.
        if RELU_MODE == 1:
            y = tl.load(relu_src_ptr + off, mask=ok, other=0.0)
            g = tl.where(y <= 0.0, 0.0, g)
        elif RELU_MODE == 2:
            x = tl.load(relu_src_ptr + off, mask=ok, other=0.0)
            # Rounded to x's dtype as the forward stored the activation: the mask of a, exactly.
            pre = (x.to(tl.float32) * relu_s[None, :] + relu_b[None, :]).to(relu_src_ptr.dtype.element_ty)
            g = tl.where(pre <= 0.0, 0.0, g)
        # (masked-out elements have g == 0: they add nothing to the sums)
        gb = g  # the gradient of the BN branch: gated (GATE), the residual's is not
        if GATE:
            gb = g * tl.load(gate_ptr + (offs_m // HW)[:, None] * gate_sn + offs_c[None, :] * gate_sc, mask=ok,
                             other=0.0).to(tl.float32)
        if SUM_G:
            acc_g += gb
            if GATE:
                acc_g_res += g
        if STATS:  # z of the statistics terms, also the v of sum(g*v) if asked
            if not IMG_MASK:
                v = tl.load(v_ptr + off, mask=ok, other=0.0).to(tl.float32)
        elif SUM_V == 1:
            v = tl.load(v_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if SUM_V == 1:
            acc_gv += gb * v
        elif SUM_V == 2:
            acc_gv += gb * x.to(tl.float32)
        if DGATE:  # the gate's gradient: g times the BN output u it multiplied
            if RELU_MODE == 2:  # u = relu(x*scale + shift), g masked already: x*scale + shift will do
                acc_du += g * (x.to(tl.float32) * s[None, :] + b_shift[None, :])
            else:
                acc_du += g * (v * s[None, :] + b_shift[None, :])
        if SUM_R:
            acc_gr += g * tl.load(r_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if WRITE_DZ:
            dz = gb
            if SCALE:
                dz = gb * s[None, :]
            if STATS:
                dz += dmean_term[None, :] + dvar_coef[None, :] * (v - mean[None, :])
            tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=ok)
        if WRITE_DRES:
            dres = g
            if RES_SCALE:
                dres = g * res_s[None, :]
            tl.store(dres_ptr + off, dres.to(dres_ptr.dtype.element_ty), mask=ok)

    # Every slot is written (zeros for sums not asked for), so no buffer needs a zero fill.
    part_off = pid_t.to(tl.int64) * C + offs_c
    if SUM_G or SUM_V != 0 or SUM_R:
        if T == 1:
            tl.store(sums_ptr + offs_c, tl.sum(acc_g, axis=0), mask=c_ok)
            tl.store(sums_ptr + C + offs_c, tl.sum(acc_gv, axis=0), mask=c_ok)
            tl.store(sums_ptr + 2 * C + offs_c, tl.sum(acc_gr, axis=0), mask=c_ok)
            if GATE and SUM_G:  # a fourth slot: the residual branch's shift gradient
                tl.store(sums_ptr + 3 * C + offs_c, tl.sum(acc_g_res, axis=0), mask=c_ok)
            elif SUM_G_TWICE:
                tl.store(sums_ptr + 3 * C + offs_c, tl.sum(acc_g, axis=0), mask=c_ok)
        else:
            tl.store(part_ptr + part_off, tl.sum(acc_g, axis=0), mask=c_ok)
            tl.store(part_ptr + T * C + part_off, tl.sum(acc_gv, axis=0), mask=c_ok)
            tl.store(part_ptr + 2 * T * C + part_off, tl.sum(acc_gr, axis=0), mask=c_ok)
            if GATE and SUM_G:
                tl.store(part_ptr + 3 * T * C + part_off, tl.sum(acc_g_res, axis=0), mask=c_ok)
            # The last run of this channel block to finish sums every run's partials, in
            # run order: one launch, the same bits whichever run arrives last.
            if last_arrival(counter_ptr + tl.program_id(1), T):
                tot_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
                tot_gv = tl.zeros((BLOCK_C,), dtype=tl.float32)
                tot_gr = tl.zeros((BLOCK_C,), dtype=tl.float32)
                tot_g_res = tl.zeros((BLOCK_C,), dtype=tl.float32)
                for t0 in range(0, T, BLOCK_T):
                    offs_t = t0 + tl.arange(0, BLOCK_T)
                    ok_t = (offs_t < T)[:, None] & c_ok[None, :]
                    off_t = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]
                    if SUM_G:
                        tot_g += tl.sum(tl.load(part_ptr + off_t, mask=ok_t, other=0.0, cache_modifier=".cg"), axis=0)
                    if SUM_V != 0:
                        tot_gv += tl.sum(tl.load(part_ptr + T * C + off_t, mask=ok_t, other=0.0,
                                                 cache_modifier=".cg"), axis=0)
                    if SUM_R:
                        tot_gr += tl.sum(tl.load(part_ptr + 2 * T * C + off_t, mask=ok_t, other=0.0,
                                                 cache_modifier=".cg"), axis=0)
                    if GATE and SUM_G:
                        tot_g_res += tl.sum(tl.load(part_ptr + 3 * T * C + off_t, mask=ok_t, other=0.0,
                                                    cache_modifier=".cg"), axis=0)
                tl.store(sums_ptr + offs_c, tot_g, mask=c_ok)
                tl.store(sums_ptr + C + offs_c, tot_gv, mask=c_ok)
                tl.store(sums_ptr + 2 * C + offs_c, tot_gr, mask=c_ok)
                if GATE and SUM_G:
                    tl.store(sums_ptr + 3 * C + offs_c, tot_g_res, mask=c_ok)
                elif SUM_G_TWICE:
                    tl.store(sums_ptr + 3 * C + offs_c, tot_g, mask=c_ok)
    if DGATE:
        tl.store(dgate_ptr + part_off, tl.sum(acc_du, axis=0), mask=c_ok)


def launch_config(M: int, C: int) -> dict:
    """``_launch_config`` memoised (host time: every BN backward pass); a copy each call."""
    return dict(_launch_config(M, C, TARGET_PROGRAMS, _runtime.INTERPRET))


@functools.lru_cache(maxsize=4096)
def _launch_config(M: int, C: int, TARGET_PROGRAMS: int, interpret: bool) -> dict:
    """Blocks, warps, row run per program and grid for an [M, C] launch (a function of M, C only).

    GPU: 2048-element tiles (32 rows x 64 channels at C >= 64) on 8 warps, 8 elements per
    thread: the 2-D accumulators and up to five loaded tiles fit in ~80 registers (sm_90
    report: 64 x 64 on 4 warps spilled at 255 registers; 64 x 64 on 8 warps needed ~155,
    one block per SM).  The interpreter takes ``rows_config``'s small tiles.
    """
    del interpret  # rows_config reads it: a part of the key
    block_c = _pow2_clamp(C, 16, 64)
    if INTERPRET:
        block_m, num_warps = rows_config(M, C)["BLOCK_M"], 4
    else:
        block_m, num_warps = _pow2_clamp(M, 16, max(16, 2048 // block_c)), 8
    c_blocks = cdiv(C, block_c)
    runs = max(1, min(cdiv(M, block_m), cdiv(TARGET_PROGRAMS, c_blocks)))
    rows_per_prog = max(1, cdiv(cdiv(M, runs), block_m)) * block_m
    runs = cdiv(max(M, 1), rows_per_prog)  # every program gets at least one row
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps, rows_per_prog=rows_per_prog,
                grid=(runs, c_blocks))


def image_launch_config(N: int, HW: int, C: int) -> dict:
    """``launch_config`` with image-aligned programs (per-image sums, DGATE): ``progs_per_image``
    programs per image, each a run of rows inside it; a function of (N, HW, C) only.  Half the
    rows per tile on a GPU: the gated variant holds five accumulators (sm_90: 136 registers at
    32 x 64, over the 128 that leave room for several blocks per SM)."""
    cfg = launch_config(N * HW, C)
    if not INTERPRET:
        cfg["BLOCK_M"] = max(16, cfg["BLOCK_M"] // 2)
    block_m, c_blocks = cfg["BLOCK_M"], cfg["grid"][1]
    runs = max(1, min(cdiv(HW, block_m), cdiv(TARGET_PROGRAMS, c_blocks * max(N, 1))))
    rows_per_prog = max(1, cdiv(cdiv(HW, runs), block_m)) * block_m
    per_image = cdiv(max(HW, 1), rows_per_prog)
    return dict(cfg, rows_per_prog=rows_per_prog, progs_per_image=per_image, grid=(N * per_image, c_blocks))


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """[N, C, H, W] -> channels_last (no copy when it already is): its memory is the [M, C] matrix.
    (Already channels_last: ``contiguous`` returns ``t`` itself after a layout test, ~0.15 us.)"""
    return None if t is None else t.contiguous(memory_format=torch.channels_last)


def _matrix_strides(shape, strides) -> Optional[Tuple[int, int]]:
    """(row, channel) element strides of an [N, C, H, W] tensor of these ``shape`` and ``strides``
    read as an [M, C] matrix without a copy (channels_last, or a broadcast such as the gradient
    of ``.sum()``), else None."""
    N, C, H, W = shape
    s_n, s_c, s_h, s_w = strides
    s_m = s_w
    if (H == 1 or s_h == W * s_m) and (N == 1 or s_n == H * W * s_m):
        return s_m, s_c
    return None


def _vec(t: Optional[Tensor]) -> Optional[Tensor]:
    """A [C] vector as the kernel reads it: fp32, contiguous.  Already so: ``t`` itself (the
    launch reads its memory, no detach needed); else a converted copy of its detached view."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.detach().float().contiguous()


def _shape_source(*ts: Optional[Tensor]) -> Tensor:
    """The first [N, C, H, W] tensor: the outputs' shape and device."""
    for t in ts:
        if t is not None and t.dim() == 4:
            return t
    raise ValueError("bn_backward needs at least one [N, C, H, W] tensor")


def _new_grad(like: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """A channels_last output of ``like``'s shape and device, or an empty placeholder when not
    asked for (op outputs cannot be None).  (``empty_like`` with an explicit memory format is
    ``torch.empty(like.shape, device=like.device, ...)``, at half its host time.)"""
    if dtype is None:
        return torch.empty(0, device=like.device)
    return torch.empty_like(like, dtype=dtype, memory_format=torch.channels_last)


# The launch passes its leading arguments by position (keywords cost ~3x the host time in
# a launch call): the pointers dz_ptr ... dparam_ptr, then these, then keywords (``_Launch.options``).
_LEAD_ARGS = ("M", "C", "rows_per_prog", "count", "eps", "HAS_DY", "RELU_MODE", "SCALE", "STATS", "STAT_DMV",
              "STAT_DAFF", "STAT_GAMMA", "WRITE_DZ", "WRITE_DRES", "RES_SCALE", "SUM_G", "SUM_V", "SUM_R",
              "BLOCK_M", "BLOCK_C", "sums_ptr", "counter_ptr", "dy_stride_m", "dy_stride_c")
_POINTERS = bn_backward_kernel.arg_names.index("M")
assert tuple(bn_backward_kernel.arg_names[_POINTERS:_POINTERS + len(_LEAD_ARGS)]) == _LEAD_ARGS


class _Launch(NamedTuple):
    """What a launch of ``bn_backward_impl`` needs beyond its tensors (see ``_launch_plan``)."""
    M: int
    N: int
    C: int
    grid: Tuple[int, int]
    sizes: tuple  # the values of M, C, rows_per_prog, count (then eps, per call)
    flags: tuple  # HAS_DY ... BLOCK_C, as in _LEAD_ARGS (then sums_ptr, counter_ptr)
    dy_strides: Tuple[int, int]
    options: dict  # the launch's other keyword arguments that are not tensors (shared: never mutated)
    sums_shape: Tuple[int, int]  # [slots, C]
    part_shape: Optional[Tuple[int, int, int]]  # [slots, row runs, C] partials; None: none needed
    dy_copy: bool  # dy cannot be read as an [M, C] matrix in place: copy it to channels_last
    any_sum: bool
    stat_dmv: bool
    stat_daff: bool
    progs_per_image: int  # (DGATE)


@functools.lru_cache(maxsize=4096)
def _launch_plan(shape: torch.Size, dy_layout: Optional[Tuple[torch.Size, Tuple[int, ...]]], has_relu_src: bool,
                 has_relu_scale: bool, has_scale: bool, stats: bool, has_dmv: bool, has_daff: bool, has_gamma: bool,
                 has_res_scale: bool, has_v: bool, v_is_relu_src: bool, has_r: bool, sum_g: bool, write_dz: bool,
                 write_dres: bool, gated: bool, dgate_on: bool, image_add: bool, image_mask: bool,
                 sum_g_twice: bool, target_programs: int, interpret: bool) -> _Launch:
    """The launch of ``bn_backward_impl`` as a function of its operands' shapes, dy's strides
    (``dy_layout``: (shape, strides), None without dy), which operands are present, and the
    flags (memoised: host time, every BN backward pass).  ``target_programs`` and
    ``interpret``: ``TARGET_PROGRAMS`` and ``_runtime.INTERPRET``, which the configuration reads."""
    del target_programs, interpret  # read by launch_config: parts of the key
    N, C, H, W = shape
    M = N * H * W
    cfg = image_launch_config(N, H * W, C) if dgate_on else launch_config(M, C)
    runs = cfg["grid"][0]
    stat_dmv = stats and has_dmv
    stat_daff = stats and has_daff
    sum_v = 2 if v_is_relu_src else 1 if has_v else 0
    if v_is_relu_src and (not has_relu_scale or not has_relu_src):
        raise ValueError("v_is_relu_src needs the affine ReLU mask (relu_src, relu_scale, relu_shift)")
    any_sum = sum_g or sum_v != 0 or has_r
    # row-run partials (summed in the launch by the last run of each channel block); a fourth
    # slot, the sum of the un-gated g, with a gate (or a copy of sum g: sum_g_twice)
    sum_g_twice = sum_g_twice and sum_g and not gated
    slots = 4 if (gated and sum_g) or sum_g_twice else 3
    part_shape = (slots, runs, C) if any_sum and runs > 1 and C > 0 else None
    dy_strides = _matrix_strides(*dy_layout) if dy_layout is not None else (0, 0)
    dy_copy = dy_strides is None
    if dy_copy:
        dy_strides = (C, 1)
    relu_mode = RELU_NONE if not has_relu_src else RELU_AFFINE if has_relu_scale else RELU_OUTPUT
    flags = (dy_layout is not None, relu_mode, has_scale, stats, stat_dmv, stat_daff, stat_daff and has_gamma,
             write_dz, write_dres, has_res_scale, sum_g, sum_v, has_r, cfg["BLOCK_M"], cfg["BLOCK_C"])
    options = dict(num_warps=cfg["num_warps"])
    if gated or image_add:
        options.update(HW=H * W, progs_per_image=cfg.get("progs_per_image", 1),
                       GATE=gated, DGATE=dgate_on, IMG_ADD=image_add)
    if image_mask:
        options.update(IMG_MASK=True)
    if sum_g_twice:
        options.update(SUM_G_TWICE=True)
    return _Launch(M, N, C, cfg["grid"], (M, C, cfg["rows_per_prog"], float(M)), flags, dy_strides, options,
                   (slots, C), part_shape, dy_copy, any_sum, stat_dmv, stat_daff, cfg.get("progs_per_image", 1))


def bn_backward_impl(
    dy: Optional[Tensor], relu_src: Optional[Tensor], relu_scale: Optional[Tensor],
    relu_shift: Optional[Tensor], scale: Optional[Tensor], z: Optional[Tensor], mean: Optional[Tensor],
    var: Optional[Tensor], dmean: Optional[Tensor], dvar: Optional[Tensor], dscale: Optional[Tensor],
    dshift: Optional[Tensor], gamma: Optional[Tensor], eps: float, res_scale: Optional[Tensor],
    v: Optional[Tensor], v_is_relu_src: bool, r: Optional[Tensor], sum_g: bool,
    dz_dtype: Optional[torch.dtype], dres_dtype: Optional[torch.dtype],
    gate: Optional[Tensor] = None, gate_shift: Optional[Tensor] = None, image_add: Optional[Tensor] = None,
    image_mask_src: Optional[Tensor] = None, image_mask_scale: Optional[Tensor] = None,
    image_mask_shift: Optional[Tensor] = None, sum_g_twice: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See ``bn_backward``.  Returns (dz or empty, dres or empty, sums [3, C] fp32,
    [d gamma, d beta] [2, C] fp32 or empty, d gate [N, C] fp32 or empty)."""
    src = _shape_source(dy, relu_src, z, v, r)
    device = src.device
    dgate_on = gate_shift is not None
    if dgate_on and (gate is None or (v is None and relu_scale is None) or scale is None or z is not None):
        raise ValueError("the gate's gradient needs the gate, v = the BN input, its scale and no statistics terms")
    if image_mask_src is not None and (image_add is None or image_mask_scale is None or image_mask_shift is None):
        raise ValueError("the image add's mask needs image_add, image_mask_scale and image_mask_shift")
    if _runtime.FAILED and _runtime.failed("bn_backward", src):  # the kernel failed to compile or launch here
        return reference.bn_backward_reference(
            dy, relu_src, relu_scale, relu_shift, scale, z, mean, var, dmean, dvar, dscale, dshift, gamma, eps,
            res_scale, v, v_is_relu_src, r, sum_g, dz_dtype, dres_dtype, gate, gate_shift, image_add,
            image_mask_src, image_mask_scale, image_mask_shift, sum_g_twice)
    dz, dres = _new_grad(src, dz_dtype), _new_grad(src, dres_dtype)
    stats = z is not None
    plan = _launch_plan(
        src.shape, None if dy is None else (dy.shape, dy.stride()), relu_src is not None, relu_scale is not None,
        scale is not None, stats, dmean is not None or dvar is not None, dscale is not None or dshift is not None,
        gamma is not None, res_scale is not None, v is not None, v_is_relu_src, r is not None, sum_g,
        dz_dtype is not None, dres_dtype is not None, gate is not None, dgate_on, image_add is not None,
        image_mask_src is not None, sum_g_twice, TARGET_PROGRAMS, _runtime.INTERPRET)
    stat_dmv, stat_daff = plan.stat_dmv, plan.stat_daff
    if stat_dmv and (dmean is None or dvar is None):  # one of the two missing: a zero term
        dmean = dmean if dmean is not None else torch.zeros_like(dvar)
        dvar = dvar if dvar is not None else torch.zeros_like(dmean)
    if stat_daff and (dscale is None or dshift is None):
        dscale = dscale if dscale is not None else torch.zeros_like(dshift)
        dshift = dshift if dshift is not None else torch.zeros_like(dscale)
    part = None  # the row runs' partials, merged inside the launch: kept scratch
    if plan.part_shape is not None:
        part = _runtime.scratch(device, plan.part_shape[0] * plan.part_shape[1] * plan.part_shape[2])
    sums = torch.empty(plan.sums_shape, device=device, dtype=torch.float32)  # every slot is written when asked
    dparam = torch.empty((2, plan.C), device=device, dtype=torch.float32) if stat_daff else sums.new_empty(0)
    if plan.dy_copy:
        dy = _rows(dy)
    relu_src, z, v, r, image_mask_src = _rows(relu_src), _rows(z), _rows(v), _rows(r), _rows(image_mask_src)
    dummy = sums  # any pointer for operands a constexpr switches off
    pick = lambda t: dummy if t is None else t  # noqa: E731
    dgate_part = torch.empty((plan.grid[0], plan.C), device=device, dtype=torch.float32) if dgate_on else None
    gate_args = {}
    if gate is not None or image_add is not None:
        gate2 = gate.reshape(gate.shape[0], -1) if gate is not None else None  # [N, C] or [N, 1]
        gate_args = dict(
            gate_ptr=pick(gate2), gate_sn=gate2.stride(0) if gate2 is not None else 0,
            gate_sc=(gate2.stride(1) if gate2.shape[1] > 1 else 0) if gate2 is not None else 0,
            shift_ptr=pick(_vec(gate_shift)), dgate_ptr=dgate_part if dgate_on else dummy,
            img_ptr=pick(_vec(image_add)))
    if image_mask_src is not None:
        gate_args.update(img_src_ptr=image_mask_src, img_scale_ptr=_vec(image_mask_scale),
                         img_shift_ptr=_vec(image_mask_shift))
    M = plan.M
    if M > 0:
        try:
            bn_backward_kernel[plan.grid](
                dz if dz_dtype is not None else dummy, dres if dres_dtype is not None else dummy, pick(part),
                pick(dy), pick(relu_src), pick(_vec(relu_scale)), pick(_vec(relu_shift)),
                pick(z if stats else v), pick(r),  # (the kernel reads z through v_ptr)
                pick(_vec(scale)), pick(_vec(res_scale)),
                pick(_vec(mean) if stats else None), pick(_vec(var) if stat_daff else None),
                pick(_vec(dmean) if stat_dmv else None), pick(_vec(dvar) if stat_dmv else None),
                pick(_vec(dscale) if stat_daff else None), pick(_vec(dshift) if stat_daff else None),
                pick(gamma if stat_daff else None), dparam,
                *plan.sizes, float(eps), *plan.flags,
                # (counters passed even when unused: one pointer type, so one binary for every batch size)
                sums, arrival_counters(device, plan.grid[1]), *plan.dy_strides,
                **plan.options, **gate_args,
            )
        except Exception as err:  # a compile/launch failure raises before the kernel runs
            _runtime.record_failure(err, _runtime.failure_key("bn_backward", src))
            return bn_backward_impl(  # (now the PyTorch path above)
                dy, relu_src, relu_scale, relu_shift, scale, z, mean, var, dmean, dvar, dscale, dshift, gamma, eps,
                res_scale, v, v_is_relu_src, r, sum_g, dz_dtype, dres_dtype, gate, gate_shift, image_add,
                image_mask_src, image_mask_scale, image_mask_shift, sum_g_twice)
    elif plan.any_sum:
        sums.zero_()
    if stat_daff and M == 0:
        dparam.zero_()
    if dgate_on:  # per-image programs -> [N, C], in a fixed order
        N, C, per_image = plan.N, plan.C, plan.progs_per_image
        dgate = dgate_part.new_zeros((N, C)) if M == 0 else dgate_part.view(N, C) if per_image == 1 \
            else dgate_part.view(N, per_image, C).sum(dim=1)
    else:
        dgate = sums.new_empty(0)
    return dz, dres, sums, dparam, dgate


# The operator is the plain implementation registered with torch.library (for torch.compile).
bn_backward_op = torch.library.custom_op("resnext::bn_backward", bn_backward_impl, mutates_args=())


@bn_backward_op.register_fake
def _(dy, relu_src, relu_scale, relu_shift, scale, z, mean, var, dmean, dvar, dscale, dshift, gamma, eps,
      res_scale, v, v_is_relu_src, r, sum_g, dz_dtype, dres_dtype, gate=None, gate_shift=None, image_add=None,
      image_mask_src=None, image_mask_scale=None, image_mask_shift=None, sum_g_twice=False):
    src = _shape_source(dy, relu_src, z, v, r)
    shape, device = src.shape, src.device
    daff = z is not None and (dscale is not None or dshift is not None)
    return (_new_grad(src, dz_dtype), _new_grad(src, dres_dtype),
            torch.empty((4 if sum_g and (gate is not None or sum_g_twice) else 3, shape[1]), device=device,
                        dtype=torch.float32),
            torch.empty((2, shape[1]) if daff else (0,), device=device, dtype=torch.float32),
            torch.empty((shape[0], shape[1]) if gate_shift is not None else (0,), device=device,
                        dtype=torch.float32))


class BNBackward(NamedTuple):
    dz: Optional[Tensor]  # [N, C, H, W] channels_last, or None when not asked for
    dres: Optional[Tensor]  # [N, C, H, W] channels_last, or None
    sum_g: Optional[Tensor]  # [C] fp32: sum of g over N, H, W
    sum_gv: Optional[Tensor]  # [C] fp32: sum of g*v
    sum_gr: Optional[Tensor]  # [C] fp32: sum of g*r
    dgamma: Optional[Tensor]  # [C] fp32 (stats with dscale/dshift): the BN weight's gradient
    dbeta: Optional[Tensor]  # [C] fp32: the BN bias's gradient
    dgate: Optional[Tensor] = None  # [N, C] fp32 (gate_shift given): sum over H, W of g * (v*scale + gate_shift)
    sum_g_ungated: Optional[Tensor] = None  # [C] fp32 (gate and sum_g): sum of g without the gate;
    #                                          (sum_g_twice, no gate): sum of g again, in its own memory


class StatsGrad(NamedTuple):
    """The batch-statistics terms of a BN backward: z, its statistics, and the gradients
    that reached them (None: no such term)."""
    z: Tensor
    mean: Tensor
    var: Tensor
    dmean: Optional[Tensor] = None  # w.r.t. the batch mean and variance (kernels.conv_bn_act's outputs)
    dvar: Optional[Tensor] = None
    dscale: Optional[Tensor] = None  # w.r.t. the BN's scale and shift (the finalize's outputs)
    dshift: Optional[Tensor] = None
    gamma: Optional[Tensor] = None  # the BN weight (None: affine=False)
    eps: float = 1e-5


_NO_STATS = StatsGrad(None, None, None)  # (immutable: no tensors)


def bn_backward(
    dy: Optional[Tensor], *,
    relu_out: Optional[Tensor] = None,
    relu_in: Optional[Tensor] = None, relu_in_scale: Optional[Tensor] = None,
    relu_in_shift: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    stats: Optional[StatsGrad] = None,
    dz_dtype: Optional[torch.dtype] = None,
    dres_dtype: Optional[torch.dtype] = None, res_scale: Optional[Tensor] = None,
    sum_g: bool = False, sum_gv: Optional[Tensor] = None, sum_gv_is_relu_in: bool = False,
    sum_gr: Optional[Tensor] = None,
    gate: Optional[Tensor] = None, gate_shift: Optional[Tensor] = None, image_add: Optional[Tensor] = None,
    image_mask: Optional[Tuple[Tensor, Tensor, Tensor]] = None, sum_g_twice: bool = False,
) -> BNBackward:
    """The elementwise BN/ReLU backward step in one pass (Triton; see the module docstring).

    All [N, C, H, W] tensors may be NCHW or channels_last (NCHW ones are copied to
    channels_last first: one extra pass each).  [C] vectors are used in fp32.

    dy: incoming gradient, or None for zero.
    relu_out: ReLU mask from an output: g = 0 where relu_out <= 0.
    relu_in, relu_in_scale, relu_in_shift: ReLU mask recomputed from an input:
        g = 0 where (relu_in*scale + shift), rounded to relu_in's dtype, is <= 0.
    scale: dz = g * scale.  stats (a ``StatsGrad``): dz += dmean'/M + dvar'*2/M*(z - mean), where
        dmean', dvar' gather the gradients of the mean and variance, directly and through the
        BN's scale and shift; then dgamma and dbeta come back too.
    dz_dtype / dres_dtype: write dz / dres = g*res_scale (or g) in that dtype; None: not written.
    sum_g, sum_gv (a tensor v, or ``sum_gv_is_relu_in`` for v = relu_in), sum_gr (a tensor r):
        per-channel fp32 sums of g, g*v, g*r.
    gate ([N, C] or [N, 1], any float dtype): a per-(image, channel) factor of the BN branch
        (a squeeze-excite gate, a drop-path mask): dz and sum_g, sum_gv use g*gate, dres, sum_gr
        and sum_g_ungated (returned with sum_g) use g.
    gate_shift ([C]): also return dgate[n, c] = sum over H, W of g * (v*scale + gate_shift),
        the gradient of the gate (v = sum_gv = the BN input z, or relu_in with the affine ReLU
        mask: then g is masked and the sum is that of g * relu(relu_in*scale + gate_shift)).
    image_add ([N, C] fp32): added to dy per (image, channel) before anything else.
    image_mask ((src [N, C, H, W], scale [C], shift [C])): image_add only where src*scale + shift
        (rounded to src's dtype) is > 0 or NaN: the gradient of a squeeze taken after a ReLU.  src is
        read in the same pass (with ``stats``, pass their z: it is read once).
    sum_g_twice (sum_g, no gate): sum_g_ungated is a second copy of sum_g, written by the kernel:
        two inputs' gradients (bn3's and the downsample BN's shift) without a clone.
    """
    if relu_out is not None and relu_in is not None:
        raise ValueError("one ReLU mask at a time")
    if (relu_in is None) != (relu_in_scale is None) or (relu_in_scale is None) != (relu_in_shift is None):
        raise ValueError("relu_in needs relu_in_scale and relu_in_shift")
    st = stats if stats is not None else _NO_STATS
    if stats is not None and sum_gv is not None:
        raise ValueError("sum_gv cannot be combined with the statistics terms")
    relu_src = relu_out if relu_out is not None else relu_in
    dz, dres, sums, dparam, dgate = eager_or_op(bn_backward_op, bn_backward_impl)(
        dy, relu_src, relu_in_scale, relu_in_shift, scale, st.z, st.mean, st.var, st.dmean, st.dvar,
        st.dscale, st.dshift, st.gamma, st.eps, res_scale, sum_gv, sum_gv_is_relu_in, sum_gr, sum_g,
        dz_dtype, dres_dtype, gate, gate_shift, image_add, *(image_mask if image_mask is not None else (None,) * 3),
        sum_g_twice)
    want_v = sum_gv is not None or sum_gv_is_relu_in
    daff = stats is not None and (st.dscale is not None or st.dshift is not None)
    return BNBackward(dz if dz_dtype is not None else None, dres if dres_dtype is not None else None,
                      sums[0] if sum_g else None, sums[1] if want_v else None,
                      sums[2] if sum_gr is not None else None,
                      dparam[0] if daff else None, dparam[1] if daff else None,
                      dgate if gate_shift is not None else None,
                      sums[3] if sum_g and (gate is not None or sum_g_twice) else None)
