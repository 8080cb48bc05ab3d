"""What the launch configurations are chosen for: a description of the compile target.

A ``Target`` holds what decides whether a kernel configuration compiles and launches on a
chip: the backend and architecture, the warp size, the shared memory one block may use
(the opt-in maximum, what Triton checks at launch), the registers per block, and the Triton
version (one formulation does not compile on sm_100 with Triton < 3.8).  The configuration
functions (``_runtime.conv_config``, ``conv_grad.wgrad_config``) take one as a part of their
memo key:

* on a live GPU, ``_runtime.target_of(tensor)`` describes its device, once per device index;
* offline (``python -m kernels._compile --target cuda:86``), ``parse_target`` gives the
  table's entry for the installed Triton;
* the CPU interpreter has its own description (``INTERPRETER``): its configurations are
  chosen for the interpreter's speed, not for a chip.

Targets are interned (one object per description: ``target_for_device`` and ``parse_target``
are memoised) and compare by identity, so a memo key hashes one pointer, not seven fields.
"""
import dataclasses
import functools
import re
from typing import Optional, Tuple

import triton

KB = 1024


def triton_version(version: Optional[str] = None) -> Tuple[int, int]:
    """(major, minor) of ``version`` (default: the installed Triton), e.g. "3.6.0" -> (3, 6)."""
    m = re.match(r"(\d+)\.(\d+)", version or triton.__version__)
    if m is None:
        raise ValueError(f"not a Triton version: {version!r}")
    return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    backend: str  # "cuda", "hip" or "interpreter"
    arch: object  # compute capability as an int (90 for sm_90) or an AMD arch name ("gfx942")
    warp_size: int
    shared_per_block: int  # bytes one block may use (the opt-in maximum)
    registers_per_block: int  # 32-bit registers
    triton: Tuple[int, int]  # (major, minor) of the Triton that compiles for it

    @property
    def key(self) -> str:
        """"cuda:90", "hip:gfx942", "interpreter": what ``--target`` takes."""
        return self.backend if self.backend == "interpreter" else f"{self.backend}:{self.arch}"

    @property
    def interpret(self) -> bool:
        return self.backend == "interpreter"

    @property
    def tcgen05_before_3_8(self) -> bool:
        """sm_100-class tensor-memory MMA with a Triton older than 3.8, which cannot compile the
        two-axis reduction of its accumulator (see ``_triton_helpers.has_nonfinite``)."""
        return self.backend == "cuda" and 100 <= self.arch < 120 and self.triton < (3, 8)

    def gpu_target(self):
        """Triton's ``GPUTarget`` for offline compilation."""
        from triton.backends.compiler import GPUTarget
        if self.interpret:
            raise ValueError("the interpreter is not a compile target")
        return GPUTarget(self.backend, self.arch, self.warp_size)

    def __repr__(self):
        return (f"Target({self.key}, warp {self.warp_size}, {self.shared_per_block // KB} KB shared/block, "
                f"Triton {self.triton[0]}.{self.triton[1]})")


# Known targets: (backend, arch) -> (warp size, shared bytes per block, registers per block).
# Shared memory per block is the opt-in maximum of CUDA's occupancy tables (cudaDevAttr-
# MaxSharedMemoryPerBlockOptin): 163 KB on sm_80, 99 KB on sm_86/89/120, 227 KB on sm_90/100;
# gfx942 (MI300) has 64 KB of LDS per workgroup and 64-wide wavefronts.
KNOWN = {
    ("cuda", 80): (32, 163 * KB, 65536),  # A100
    ("cuda", 86): (32, 99 * KB, 65536),  # RTX 30xx, A10, A40
    ("cuda", 89): (32, 99 * KB, 65536),  # RTX 40xx, L4, L40
    ("cuda", 90): (32, 227 * KB, 65536),  # H100, H200
    ("cuda", 100): (32, 227 * KB, 65536),  # B200
    ("cuda", 120): (32, 99 * KB, 65536),  # RTX 50xx
    ("hip", "gfx942"): (64, 64 * KB, 131072),  # MI300X (512 VGPRs x 64 lanes x 4 SIMDs / 4 wavefronts)
}
TARGET_KEYS = [f"{b}:{a}" for b, a in KNOWN]
DEFAULT_KEY = "cuda:90"  # what the kernels were designed on; the configurations when none is given


@functools.lru_cache(maxsize=None)
def _intern(backend: str, arch, warp_size: int, shared: int, registers: int, version: Tuple[int, int]) -> Target:
    return Target(backend, arch, warp_size, shared, registers, version)


def parse_target(key: str, version: Optional[str] = None) -> Target:
    """The table's target for "cuda:86" / "sm_86" / "hip:gfx942" (Triton: the installed one)."""
    if not isinstance(key, str):
        raise TypeError(f"target must be a string like 'cuda:90', got {type(key).__name__}")
    m = re.fullmatch(r"(?:cuda:|sm_?)(\d+)a?|hip:(gfx[0-9a-f]+)", key.strip().lower())
    if m is None:
        raise ValueError(f"unknown target {key!r}: expected one of {', '.join(TARGET_KEYS)}")
    backend, arch = ("cuda", int(m.group(1))) if m.group(1) else ("hip", m.group(2))
    if (backend, arch) not in KNOWN:
        raise ValueError(f"unknown target {key!r}: expected one of {', '.join(TARGET_KEYS)}")
    warp, shared, regs = KNOWN[(backend, arch)]
    return _intern(backend, arch, warp, shared, regs, triton_version(version))


@functools.lru_cache(maxsize=None)
def interpreter_target() -> Target:
    """The CPU interpreter: no shared-memory limit, configurations chosen for its speed."""
    return _intern("interpreter", "cpu", 32, 1 << 30, 1 << 30, triton_version())


@functools.lru_cache(maxsize=None)
def default_target() -> Target:
    return parse_target(DEFAULT_KEY)


@functools.lru_cache(maxsize=None)
def target_for_device(index: int) -> Target:
    """The target of CUDA/ROCm device ``index``, read from the device once (memoised)."""
    import torch
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip:
        arch = props.gcnArchName.split(":")[0]
        warp, shared, regs = KNOWN.get(("hip", arch), (64, 64 * KB, 131072))
        return _intern("hip", arch, int(getattr(props, "warp_size", warp)),
                       int(getattr(props, "shared_memory_per_block_optin", 0) or shared), regs, triton_version())
    cc = props.major * 10 + props.minor
    warp, shared, regs = KNOWN.get(("cuda", cc), (32, 99 * KB, 65536))  # unknown chip: the smallest limit
    return _intern("cuda", cc, int(getattr(props, "warp_size", warp)),
                   int(getattr(props, "shared_memory_per_block_optin", 0) or shared), regs, triton_version())
