"""Run a converted model's inference and whole training step as one CUDA graph.

    infer = graph_inference(model.eval(), example_x)            # model(x) under no_grad
    y = infer(x)                                                 # copy in, replay, static output

    step = graph_train_step(model, loss_fn, optimizer, example_x, example_target)
    loss = step(x, target)                                       # forward, loss, backward, step

Both follow PyTorch's CUDA-graphs recipe ("whole network capture"): warm-up iterations on a
side stream (they compile the Triton kernels and create cuBLAS/cuDNN state and the
optimizer's state), then one capture with ``torch.cuda.graph`` on that same stream, of
work that reads a static input buffer.  A call copies its arguments into the static
buffers and replays; nothing is allocated and nothing syncs the host.

Why plain ``torch.cuda.graph`` and not the alternatives:

* ``torch.cuda.make_graphed_callables`` is PyTorch's *partial*-network capture: forward and
  backward become two graphs inside an autograd node, while the loss and the optimizer step
  (one launch per parameter group and op, without ``foreach``) stay eager.  Whole-step
  capture replays everything in one launch and needs nothing from the model beyond what
  the fused modules guarantee (no host sync, idempotent kernel launches, running
  statistics updated in place on the device).
* ``torch.compile(mode="reduce-overhead")`` (CUDA-graph trees) re-traces the model through
  Dynamo and Inductor, graphs forward and backward separately and leaves the optimizer
  step to a separate compile; it is a heavier dependency for the same result.  It remains
  an option (the custom ops are compile-ready) but is not what this module does.

What replays do, exactly as eager would: train-mode BatchNorm updates ``running_mean``,
``running_var`` and ``num_batches_tracked`` on every replay (``momentum=None`` included:
its factor is computed on the device), the optimizer updates parameters and its state in
place, and the gradients are recomputed (not accumulated) in the ``.grad`` tensors the
capture allocated.  The warm-up steps are *undone* before the capture (parameters,
buffers, optimizer state and the CUDA RNG state are restored in place; optimizer state that
the warm-up created is reset to zero, which is a fresh state for SGD with ``dampening=0``,
Adam, AdamW and RMSprop), so k replays leave the model as k eager steps would.

Constraints (PyTorch's, for any CUDA graph): fixed shapes, dtypes, devices and memory
formats (checked on every call: a ``ValueError`` names the difference); the parameter,
buffer and optimizer-state tensors must stay the same objects (in-place changes such as
``load_state_dict`` or ``param.data.copy_`` are seen by the next replay; ``model.to(...)``,
replacing ``.grad``, or a new optimizer are not); a Python-float learning rate is baked in
at capture (use a tensor ``lr``, or capture again, to change it).  Mixed precision:
``autocast_dtype`` wraps the captured forward and loss in
``torch.autocast("cuda", dtype, cache_enabled=False)`` (autocast's weight-cast cache must be
off inside graphs, as ``make_graphed_callables`` also requires).  ``GradScaler`` cannot be
captured (its inf check syncs the host), so float16 training runs without loss scaling;
prefer bfloat16.
"""
import contextlib
import copy
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["graph_inference", "graph_train_step", "GraphedInference", "GraphedTrainStep"]

_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------
def memory_format_name(t: Tensor) -> str:
    """"contiguous", "channels_last" or "strided" (neither): the layout a static buffer keeps."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def _spec(t: Tensor) -> Tuple[Tuple[int, ...], torch.dtype, torch.device, str]:
    return tuple(t.shape), t.dtype, t.device, memory_format_name(t)


def check_like(name: str, x: Any, spec: Tuple[Tuple[int, ...], torch.dtype, torch.device, str]) -> None:
    """Raise when ``x`` differs from the captured example ``spec`` (shape, dtype, device, format)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    shape, dtype, device, fmt = spec
    for what, got, want in (("shape", tuple(x.shape), shape), ("dtype", x.dtype, dtype),
                            ("device", x.device, device), ("memory format", memory_format_name(x), fmt)):
        if got != want:
            raise ValueError(f"{name} has {what} {list(got) if what == 'shape' else got} but the graph was "
                             f"captured for {list(want) if what == 'shape' else want}: a CUDA graph replays "
                             f"fixed shapes, dtypes, devices and memory formats (capture another graph "
                             f"for this one)")


def _check_autocast_dtype(autocast_dtype: Optional[torch.dtype]) -> None:
    if autocast_dtype is not None and autocast_dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}")
    if autocast_dtype is None and torch.is_autocast_enabled("cuda"):
        raise ValueError("called inside torch.autocast: autocast's weight-cast cache must be off inside a CUDA "
                         "graph; pass autocast_dtype= instead (the graph then runs under "
                         "torch.autocast('cuda', dtype, cache_enabled=False))")


def _check_warmup(warmup_iters: int) -> None:
    if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 1:
        raise ValueError(f"warmup_iters must be an int >= 1 (the warm-up compiles the kernels before the "
                         f"capture), got {warmup_iters!r}")


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _check_cuda(model: nn.Module, example: Tensor, what: str = "example_input",
                extra: Tuple[Tensor, ...] = ()) -> torch.device:
    """All of the model's tensors and the examples on one CUDA device; returns it."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device: torch.cuda.is_available() is False "
                           "(run the model eagerly instead)")
    if example.device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device: {what} is on {example.device} "
                           f"(move the model and its inputs with .cuda())")
    device = example.device
    named = [("parameter", n, t) for n, t in model.named_parameters()] + \
            [("buffer", n, t) for n, t in model.named_buffers()]
    for kind, n, t in named:
        if t.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device: {kind} {n!r} is on {t.device} "
                               f"(move the model with model.cuda())")
        if t.device != device:
            raise ValueError(f"{kind} {n!r} is on {t.device} but {what} is on {device}")
    for name, t in extra:
        if t.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device: {name} is on {t.device}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {what} is on {device}")
    return device


def _autocast(dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def _static_buffer(t: Tensor) -> Tensor:
    """A private copy of ``t`` in the same memory format (contiguous for a strided example)."""
    fmt = torch.channels_last if memory_format_name(t) == "channels_last" else torch.contiguous_format
    buf = torch.empty_like(t, memory_format=fmt, requires_grad=False)
    buf.copy_(t.detach())
    return buf


def _tree_map(fn: Callable[[Tensor], Tensor], out: Any) -> Any:
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # NamedTuple
        return type(out)(*(_tree_map(fn, o) for o in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_tree_map(fn, o) for o in out)
    if isinstance(out, dict):
        return type(out)((k, _tree_map(fn, v)) for k, v in out.items())
    return out


# --------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------
class GraphedInference:
    """``model(x)`` under ``torch.no_grad()`` as one CUDA graph (built by ``graph_inference``).

    ``self(x)`` copies ``x`` into ``static_input``, replays ``graph`` and returns
    ``static_output``, which the next call overwrites (``clone=True`` returns a copy).
    """

    def __init__(self, graph, static_input: Tensor, static_output: Any, spec, clone: bool):
        self.graph, self.static_input, self.static_output = graph, static_input, static_output
        self._spec, self.clone = spec, clone

    def __call__(self, x: Tensor) -> Any:
        check_like("x", x, self._spec)
        self.static_input.copy_(x)
        self.graph.replay()
        return _tree_map(torch.clone, self.static_output) if self.clone else self.static_output


def graph_inference(model: nn.Module, example_input: Tensor, *, autocast_dtype: Optional[torch.dtype] = None,
                    clone: bool = False, warmup_iters: int = 3) -> GraphedInference:
    """Capture ``model(x)`` (under ``torch.no_grad()``) as a CUDA graph; returns ``f(x) -> y``.

    model: in eval mode (every submodule), on the CUDA device of ``example_input``.
    example_input: fixes the shape, dtype, device and memory format every later ``x`` must
        have (a ``ValueError`` names a difference); use channels_last for the fused kernels.
    autocast_dtype: None, torch.bfloat16 or torch.float16: the forward runs under
        ``torch.autocast("cuda", dtype, cache_enabled=False)``.
    clone: False (default) returns the graph's static output tensor(s), overwritten by the
        next call; True returns a copy each call (one allocation and copy per call).
    warmup_iters: eager forwards on a side stream before the capture (they compile the kernels).

    Replays read the model's parameters and running statistics at replay time, so in-place
    updates (``load_state_dict``, an optimizer) are seen; replaced tensors are not.
    """
    _check_module(model)
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    training = [name or "model" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"graph_inference needs a model in eval mode, but {training[0]!r}"
                         f"{f' and {len(training) - 1} more modules are' if len(training) > 1 else ' is'} "
                         f"in training mode (call model.eval(); train-mode BatchNorm would update its running "
                         f"statistics on every replay)")
    _check_autocast_dtype(autocast_dtype)
    _check_warmup(warmup_iters)
    device = _check_cuda(model, example_input)

    spec = _spec(example_input)
    with torch.cuda.device(device):
        static_input = _static_buffer(example_input)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad():
            with torch.cuda.stream(stream):
                for _ in range(warmup_iters):
                    with _autocast(autocast_dtype):
                        model(static_input)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                with _autocast(autocast_dtype):
                    static_output = model(static_input)
        torch.cuda.current_stream().wait_stream(stream)
    return GraphedInference(graph, static_input, static_output, spec, clone)


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
class GraphedTrainStep:
    """One training step (forward, loss, backward, ``optimizer.step()``) as one CUDA graph.

    ``self(x, target)`` copies both into ``static_input``/``static_target``, replays and
    returns ``static_loss`` (a detached 0-d tensor the next call overwrites: ``.item()`` or
    ``.clone()`` it to keep it).  ``static_output`` holds the model's output of the last step;
    the parameters' ``.grad`` hold its gradients.
    """

    def __init__(self, graph, static_input, static_target, static_output, static_loss, input_spec, target_spec):
        self.graph, self.static_input, self.static_target = graph, static_input, static_target
        self.static_output, self.static_loss = static_output, static_loss
        self._input_spec, self._target_spec = input_spec, target_spec

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        check_like("x", x, self._input_spec)
        check_like("target", target, self._target_spec)
        self.static_input.copy_(x)
        self.static_target.copy_(target)
        self.graph.replay()
        return self.static_loss


def _distinct(tensors) -> List[Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class _Snapshot:
    """Model tensors, optimizer state and the CUDA RNG state, to undo the warm-up in place."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        tensors = _distinct(list(model.parameters()) + list(model.buffers())
                            + [p for g in optimizer.param_groups for p in g["params"]])
        self.tensors = [(t, t.detach().clone()) for t in tensors]
        self.state: Dict[Tensor, Dict[str, Any]] = {
            p: {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in s.items()}
            for p, s in optimizer.state.items()}
        self.device = device
        self.rng = torch.cuda.get_rng_state(device)

    @torch.no_grad()
    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for t, saved in self.tensors:
            t.copy_(saved)
        for p, s in optimizer.state.items():
            before = self.state.get(p, {})
            for k, v in list(s.items()):
                if k in before:
                    old = before[k]
                    if isinstance(v, Tensor) and isinstance(old, Tensor) and v.shape == old.shape:
                        v.copy_(old)  # same tensor object: the capture will read and write it
                    else:
                        s[k] = old
                elif isinstance(v, Tensor):
                    v.zero_()  # created by the warm-up: a fresh state (see the module docstring)
        torch.cuda.set_rng_state(self.rng, self.device)
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for i, group in enumerate(optimizer.param_groups):
        if "capturable" in group and not group["capturable"]:
            raise ValueError(f"{type(optimizer).__name__} param group {i} has capturable=False: its step cannot be "
                             f"captured in a CUDA graph; create it with capturable=True, e.g. "
                             f"torch.optim.{type(optimizer).__name__}(params, ..., capturable=True)")


def _warn_inexact_fresh_state(optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group.get("momentum", 0) and group.get("dampening", 0):
            if any("momentum_buffer" not in optimizer.state.get(p, {}) for p in group["params"]):
                warnings.warn("SGD with momentum and dampening != 0 starts its momentum buffer from the first "
                              "gradient (no dampening); the graphed step starts it from zero, so its first step "
                              "differs from eager SGD's (take one eager step before graph_train_step to avoid it)",
                              stacklevel=3)
                return


def graph_train_step(model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], optimizer: torch.optim.Optimizer,
                     example_input: Tensor, example_target: Tensor, *,
                     autocast_dtype: Optional[torch.dtype] = None, warmup_iters: int = 3) -> GraphedTrainStep:
    """Capture a whole training step as a CUDA graph; returns ``step(x, target) -> loss``.

    The step is ``loss = loss_fn(model(x), target); loss.backward(); optimizer.step()`` with
    the gradients recomputed (not accumulated) each replay, so no ``zero_grad`` is needed.
    model: on the CUDA device of ``example_input``, in whatever train/eval mode per module the
        step should use (train-mode BatchNorm updates its running statistics every replay).
    loss_fn: ``loss_fn(output, target)`` returning a scalar tensor (e.g. ``nn.CrossEntropyLoss()``).
    optimizer: capturable: ``torch.optim.SGD``, or Adam/AdamW/... created with ``capturable=True``.
    example_input, example_target: fix the shapes, dtypes, devices and memory formats of every
        later call (a ``ValueError`` names a difference).  They are copied, never aliased.
    autocast_dtype: None, torch.bfloat16 or torch.float16: forward and loss run under
        ``torch.autocast("cuda", dtype, cache_enabled=False)``; backward and step outside it.
        No GradScaler (not capturable): prefer bfloat16.
    warmup_iters: eager steps on a side stream before the capture; their effect on the
        parameters, buffers, optimizer state and CUDA RNG is undone before the capture, so
        the model is as it was on entry and k calls equal k eager steps.
    """
    _check_module(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
    _check_optimizer(optimizer)
    for name, t in (("example_input", example_input), ("example_target", example_target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_autocast_dtype(autocast_dtype)
    _check_warmup(warmup_iters)
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    device = _check_cuda(model, example_input,
                         extra=(("example_target", example_target),) +
                         tuple((f"optimizer parameter {i}", p) for i, p in enumerate(opt_params)))
    _warn_inexact_fresh_state(optimizer)

    input_spec, target_spec = _spec(example_input), _spec(example_target)

    def step(x: Tensor, target: Tensor):
        with _autocast(autocast_dtype):
            out = model(x)
            loss = loss_fn(out, target)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a one-element tensor, got "
                             f"{type(loss).__name__ if not isinstance(loss, Tensor) else list(loss.shape)}")
        loss.backward()
        optimizer.step()
        return out, loss

    with torch.cuda.device(device):
        static_input = _static_buffer(example_input)
        static_target = _static_buffer(example_target)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            snapshot = _Snapshot(model, optimizer, device)
            try:
                with warnings.catch_warnings():  # capturable=True optimizers warn when run uncaptured
                    warnings.filterwarnings("ignore", message=".*capturable=True.*")
                    for _ in range(warmup_iters):
                        optimizer.zero_grad(set_to_none=True)
                        model.zero_grad(set_to_none=True)
                        step(static_input, static_target)
            finally:
                snapshot.restore(model, optimizer)  # also sets every .grad to None (the recipe)
            del snapshot
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out, loss = step(static_input, static_target)
        torch.cuda.current_stream().wait_stream(stream)
    static_output = _tree_map(Tensor.detach, out)
    return GraphedTrainStep(graph, static_input, static_target, static_output, loss.detach(),
                            input_spec, target_spec)
