"""Small ``@triton.jit`` functions shared by the convolution kernels."""
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, ALLOW_TF32: tl.constexpr):
    """acc + a @ b in fp32: TF32 when allowed (fp32 inputs), else exact products."""
    if ALLOW_TF32:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def has_nonfinite(acc, FLAT: tl.constexpr = False):
    """Whether a 2-D tile holds a NaN or an Inf (one block-wide reduction).  ``FLAT``: reduce
    the flattened tile instead of one axis after the other (a shared-memory round trip):
    Triton < 3.8 cannot compile the two-axis reduction of an sm_100 tensor-memory
    accumulator (``TritonNvidiaGPUOptimizeTMemLayoutsPass``: "parent layout must have at
    least rank >= 2"); ``_runtime.conv_config`` asks for it on that pair only."""
    bad = (acc != acc) | (tl.abs(acc) == float("inf"))
    if FLAT:
        return tl.max(tl.reshape(bad.to(tl.int32), (acc.shape[0] * acc.shape[1],)), axis=0) > 0
    return tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def last_arrival(counter_ptr, arrivals):
    """Whether this program is the last of ``arrivals`` programs to reach this call on
    ``counter_ptr`` (an int32 from ``_runtime.arrival_counters``, zero before the launch and
    left zero after it: the last arrival resets it, so launches and CUDA-graph replays
    stay idempotent).

    A deterministic in-kernel reduction: every program stores its partial, calls this, and
    the last one sums all partials in a fixed order (loads with ``cache_modifier=".cg"``,
    from L2).  The barrier orders every thread's stores before the one thread's atomic,
    whose release (``acq_rel``, GPU scope) publishes them; its acquire makes the others'
    visible to the last program.  The counter only elects the reducer: which program
    arrives last changes no bit of the result.
    """
    tl.debug_barrier()
    prior = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = prior == arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    return last


@triton.jit
def bn_stats_backward(offs, ok, mean, var_ptr, dscale_ptr, dshift_ptr, gamma_ptr, eps,
                      HAS_GAMMA: tl.constexpr, BLOCK: tl.constexpr):
    """The finalize's backward on [BLOCK] channel vectors (``reference.bn_stats_backward``):
    scale = gamma * r, shift = beta - mean * scale, r = (var + eps)^-1/2.  From the gradients
    reaching scale and shift, returns those reaching the batch mean and (biased) variance
    through them, and gamma's and beta's; ``mean`` is already loaded (fp32)."""
    r = 1.0 / tl.sqrt(tl.load(var_ptr + offs, mask=ok, other=1.0) + eps)
    d_scale = tl.load(dscale_ptr + offs, mask=ok, other=0.0)
    d_shift = tl.load(dshift_ptr + offs, mask=ok, other=0.0)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        gamma = tl.full((BLOCK,), 1.0, tl.float32)
    d_gr = d_scale - d_shift * mean  # the gradient w.r.t. gamma * r
    return -d_shift * gamma * r, d_gr * gamma * (-0.5 * r * r * r), d_gr * r, d_shift
