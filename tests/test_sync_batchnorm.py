"""SyncBatchNorm across processes (gloo, CPU): the fused statistics merged over ranks.

A converted model whose BatchNorms are ``nn.SyncBatchNorm`` (``convert`` turns them into
``resnext.SyncBatchNorm2d``), run on ranks with uneven local batches (an empty one too:
nn.SyncBatchNorm takes part in the collectives with a zero count and leaves the rank's
output empty), must equal ONE process running plain ``BatchNorm2d`` on the whole batch:
outputs, every gradient (summed over ranks = DDP's average x world size), running
statistics and num_batches_tracked.  Also: DDP with momentum SGD over several steps, a
process group that is a subgroup, one collective per BN forward and one per BN backward
(counted by wrapping torch.distributed's functions), none in eval mode, torch.compile, and
the example script under torchrun.

Workers are spawned processes; they run the kernels in Triton's interpreter (this module
sets TRITON_INTERPRET=1 before importing kernels, as tests/conftest.py does).
"""
import os

import torch

if not torch.cuda.is_available():  # as tests/conftest.py; repeated for spawned workers
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import kernels._runtime  # noqa: E402
import resnext  # noqa: E402
from helpers import randomize_bn  # noqa: E402
from kernels.batchnorm import bn_finalize_kernel  # noqa: E402
from resnext.models import Bottleneck  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (3, 6, 6)  # per image
CLASSES = 5
N_BN = 6  # BatchNorms in Net: each one all-gather forward, one all-reduce backward
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce", "broadcast",
               "reduce_scatter_tensor", "all_to_all_single")


class Net(nn.Module):
    """Every path of a SyncBatchNorm: a biased stem conv (its BN is not fused: it runs on its
    own, ``CrossRankBNFn``), a fused Conv-BN-ReLU run, a fused strided grouped bottleneck with
    a fused downsample (the last BN sees 3x3 values per image)."""

    def __init__(self, fused_stem: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=not fused_stem), nn.BatchNorm2d(8), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(16, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.body = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  Bottleneck(16, 4, stride=2, downsample=down, groups=2))
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def make_net(fused_stem: bool = False, dtype=torch.float32, momentum=0.1) -> nn.Module:
    torch.manual_seed(0)
    net = randomize_bn(Net(fused_stem)).train().to(dtype)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum  # None: a cumulative average
    return net


def batch(total: int, step: int = 0, dtype=torch.float32):
    """The whole batch of a step and the fixed output weights of its loss sum(out * w)."""
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(total, *SHAPE, generator=g).to(dtype), torch.randn(total, CLASSES, generator=g).to(dtype))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectiveCounter:
    """Counts calls of torch.distributed's collectives (wrapped in the module namespace)."""

    def __init__(self):
        self.calls = []
        for name in COLLECTIVES:
            real = getattr(dist, name, None)
            if real is not None:
                setattr(dist, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)
        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


class NoHostSync:
    """Every Tensor -> Python conversion raises inside (except in Triton's interpreter, which
    runs kernels on the host by design), as tests/test_ecosystem.py's guard."""
    METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, on: bool):
        self.on, self.saved = on, {}

    def __enter__(self):
        for name in self.METHODS if self.on else ():
            real = self.saved[name] = getattr(torch.Tensor, name)

            def guarded(t, *args, _name=name, _real=real, **kwargs):
                if "triton" not in sys._getframe(1).f_code.co_filename:
                    raise AssertionError(f"host sync: Tensor.{_name}() on the hot path")
                return _real(t, *args, **kwargs)
            setattr(torch.Tensor, name, guarded)

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


def _worker(rank: int, world: int, port: int, out_dir: str, case: dict):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        counter = CollectiveCounter()
        batches = case["batches"]
        group = None
        if case.get("subgroup"):  # ranks 0 and 1 share a group; rank 2 is alone in its own
            groups = [dist.new_group([0, 1]), dist.new_group([2])]
            group = groups[0] if rank < 2 else groups[1]
        dtype = case.get("dtype", torch.float32)  # float64: the fused modules' reference path
        model = resnext.convert(nn.SyncBatchNorm.convert_sync_batchnorm(
            make_net(case.get("fused_stem", False), dtype, case.get("momentum", 0.1)), process_group=group))
        record = dict(interpret=kernels._runtime.INTERPRET, steps=[],
                      types=sorted({type(m).__name__ for m in model.modules()}))
        if case.get("no_host_sync"):  # the guard itself works
            try:
                with NoHostSync(True):
                    torch.ones(1).item()
            except AssertionError:
                record["guard_works"] = True
        run = model
        if case.get("ddp"):
            run = DDP(model)
        if case.get("compile"):
            run = torch.compile(model, backend="aot_eager", fullgraph=case.get("fullgraph", False))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if case.get("steps", 1) > 1 else None
        start = sum(batches[:rank])
        for step in range(case.get("steps", 1)):
            x_all, w_all = batch(sum(batches), step, dtype)
            x, w = x_all[start:start + batches[rank]], w_all[start:start + batches[rank]]
            model.zero_grad(set_to_none=False)
            counter.take()
            with NoHostSync(case.get("no_host_sync", False)):
                out = run(x)
                fwd = counter.take()
                loss = (out * w).sum()  # DDP averages the gradients: the whole batch's loss / world size
                loss.backward()
            bwd = counter.take()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            if not case.get("ddp"):  # the sum over ranks = DDP's average x world size
                for g in grads.values():
                    dist.all_reduce(g, group=group)
            record["steps"].append(dict(out=out.detach(), grads=grads, fwd=fwd, bwd=bwd))
            if opt is not None:
                opt.step()
        record["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        if case.get("eval"):
            model.eval()
            counter.take()
            with torch.no_grad():
                record["eval_out"] = model(x)
            record["eval_calls"] = counter.take()
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_workers(tmp_path, world: int, case: dict):
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), str(tmp_path), case), nprocs=world, join=True)
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(r["interpret"] == (not torch.cuda.is_available()) for r in records), "workers: interpreter expected"
    for r in records:
        assert "SyncBatchNorm" not in r["types"] and "SyncBatchNorm2d" in r["types"], r["types"]
    return records


def reference_run(ranks, batches, steps=1, lr=0.1, average=1, fused_stem=False, dtype=torch.float32,
                  momentum=0.1):
    """ONE process, plain BatchNorm2d, the whole batch of ``ranks`` (their local batches)."""
    model = make_net(fused_stem, dtype, momentum)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if steps > 1 else None
    sel = [(sum(batches[:r]), batches[r]) for r in ranks]
    out_steps = []
    for step in range(steps):
        x_all, w_all = batch(sum(batches), step, dtype)
        x = torch.cat([x_all[s:s + n] for s, n in sel])
        w = torch.cat([w_all[s:s + n] for s, n in sel])
        model.zero_grad(set_to_none=False)
        out = model(x)
        ((out * w).sum() / average).backward()
        outs, i = {}, 0
        for r, (_, n) in zip(ranks, sel):
            outs[r] = out[i:i + n].detach()
            i += n
        out_steps.append(dict(out=outs, grads={n: p.grad.clone() for n, p in model.named_parameters()}))
        if opt is not None:
            opt.step()
    return out_steps, model.state_dict()


def assert_close(ours, ref, tol, what, atol=1e-6):
    """|ours - ref| <= tol * (|ref| + max|ref|) + atol (atol: gradients that are zero in exact
    arithmetic, as a conv bias's before a BatchNorm, are rounding noise on both sides)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (ours - ref).abs()
    assert (err <= tol * (ref.abs() + scale) + atol).all(), f"{what}: max error {err.max().item():.3g} " \
                                                              f"(scale {scale:.3g})"


def compare(rec, ref_steps, ref_state, rank, tol=1e-4, tol_state=1e-4, atol=1e-6):
    for i, (ours, ref) in enumerate(zip(rec["steps"], ref_steps)):
        assert_close(ours["out"], ref["out"][rank], tol, f"rank {rank} step {i} output", atol)
        assert ours["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert_close(ours["grads"][name], g, tol, f"rank {rank} step {i} grad {name}", atol)
    assert rec["state"].keys() == ref_state.keys()
    for name, v in ref_state.items():
        if v.is_floating_point():
            assert_close(rec["state"][name], v, tol_state, f"rank {rank} {name}", atol)
        else:
            assert torch.equal(rec["state"][name], v), f"rank {rank} {name}: {rec['state'][name]} vs {v}"


@pytest.mark.parametrize("batches, dtype, fused", [((3, 1), torch.float32, False), ((2, 0, 1), torch.float32, True),
                                                   ((3, 1), torch.float64, False)],
                         ids=["2ranks_3_1", "3ranks_2_0_1_all_fused_no_host_sync_momentum_none",
                              "2ranks_3_1_float64_reference_path"])
def test_uneven_batches_equal_one_process(tmp_path, batches, dtype, fused):
    """all_fused: every BN fused, momentum=None (the count on the device), and no host sync."""
    world = len(batches)
    momentum = None if fused else 0.1
    records = run_workers(tmp_path, world, dict(batches=list(batches), dtype=dtype, fused_stem=fused,
                                                no_host_sync=fused, momentum=momentum))
    ref_steps, ref_state = reference_run(range(world), list(batches), dtype=dtype, fused_stem=fused,
                                         momentum=momentum)
    tol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    for rank, rec in enumerate(records):
        assert rec.get("guard_works", False) == fused
        compare(rec, ref_steps, ref_state, rank, tol, tol, atol)
        # one collective per BatchNorm forward and one per backward, nothing else
        assert rec["steps"][0]["fwd"] == ["all_gather"] * N_BN, rec["steps"][0]["fwd"]
        assert rec["steps"][0]["bwd"] == ["all_reduce"] * N_BN, rec["steps"][0]["bwd"]


def test_ddp_momentum_sgd_steps_equal_one_process(tmp_path):
    batches, steps = [3, 1], 3
    records = run_workers(tmp_path, 2, dict(batches=batches, ddp=True, steps=steps))
    ref_steps, ref_state = reference_run(range(2), batches, steps=steps, average=2)
    for rank, rec in enumerate(records):
        compare(rec, ref_steps, ref_state, rank, tol=1e-4, tol_state=1e-3)


def test_subgroup_and_eval_without_collectives(tmp_path):
    """Ranks 0 and 1 sync over their subgroup; rank 2, alone in its group, runs plain BN."""
    batches = [2, 1, 2]
    records = run_workers(tmp_path, 3, dict(batches=batches, subgroup=True, eval=True))
    ref_steps, ref_state = reference_run([0, 1], batches)
    for rank in (0, 1):
        compare(records[rank], ref_steps, ref_state, rank)
        assert records[rank]["steps"][0]["fwd"] == ["all_gather"] * N_BN
        assert records[rank]["steps"][0]["bwd"] == ["all_reduce"] * N_BN
    ref_steps, ref_state = reference_run([2], batches)
    compare(records[2], ref_steps, ref_state, 2)
    assert records[2]["steps"][0]["fwd"] == records[2]["steps"][0]["bwd"] == []
    # eval mode: running statistics, no communication (the eval output itself: rank 2 vs rank 0's)
    for rank, rec in enumerate(records):
        assert rec["eval_calls"] == [], f"rank {rank}: collectives in eval mode: {rec['eval_calls']}"
        assert not torch.isnan(rec["eval_out"]).any()


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fused_fullgraph", "standalone_bn_graph_break"])
def test_torch_compile(tmp_path, fullgraph, fresh_dynamo):
    """fullgraph: every BN fused (the collectives sit inside the custom operators); otherwise
    the stem's BN runs on its own and its collectives are a graph break."""
    batches = [3, 1]
    records = run_workers(tmp_path, 2, dict(batches=batches, compile=True, fullgraph=fullgraph,
                                            fused_stem=fullgraph))
    ref_steps, ref_state = reference_run(range(2), batches, fused_stem=fullgraph)
    for rank, rec in enumerate(records):
        compare(rec, ref_steps, ref_state, rank)
        assert rec["steps"][0]["fwd"] == ["all_gather"] * N_BN, rec["steps"][0]["fwd"]
        assert rec["steps"][0]["bwd"] == ["all_reduce"] * N_BN, rec["steps"][0]["bwd"]


def test_example_runs_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node=2 -m resnext.examples.train_ddp --tiny``: a 2-process gloo
    job on tiny data; every BN a SyncBatchNorm2d, the replicas equal after the steps."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "resnext.examples.train_ddp", "--tiny", "--image-size=8",
           "--steps=2", f"--out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "step 1: loss" in proc.stdout
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in records:
        assert r["world"] == 2 and len(r["losses"]) == 2 and all(map(torch.isfinite, torch.tensor(r["losses"])))
        assert r["sync_bns"] == 17 and r["torch_sync_bns"] == 0, r
    assert records[0]["param_checksum"] == records[1]["param_checksum"], "DDP replicas differ"


# --------------------------------------------------------------------------------------
# One process: the cross-rank merge kernel, convert
# --------------------------------------------------------------------------------------
def _rank_rows(data, C):
    """float64 (count, mean, M2) rows [W, 3, C] of per-rank data [n_r, C]."""
    zeros = torch.zeros(C, dtype=torch.float64)
    return torch.stack([torch.stack([torch.full((C,), float(len(d)), dtype=torch.float64),
                                     d.mean(0) if len(d) else zeros,
                                     ((d - d.mean(0)) ** 2).sum(0) if len(d) else zeros]) for d in data])


def test_rank_row_merge_kernel_matches_float64():
    """ROW_COUNTS: (count, mean, M2) rows of uneven counts, empty ranks included, merged with
    Chan's formula; scale/shift and the running statistics with the total count; |mean| >> std."""
    C, counts = 5, [7, 0, 1, 12, 0]
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(n, C, generator=g, dtype=torch.float64) * 0.5 + 1000.0 for n in counts]
    rows = _rank_rows(data, C).float()
    whole = torch.cat(data)  # 20 values per channel
    gamma, beta = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    rm, rv, nbt = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5, torch.tensor(4)
    rm0, rv0 = rm.clone(), rv.clone()
    out = [torch.full((C,), float("nan")) for _ in range(4)]
    bn_finalize_kernel[(1,)](*out, rows, rows, gamma, beta, rm, rv, nbt, len(counts), C, 0, 1, 0.1, 1e-5,
                             AFFINE=True, UPDATE=True, CUMULATIVE=False, COUNT=True, BLOCK_T=32, BLOCK_C=8,
                             ROW_COUNTS=True)
    # float64 merge of the same fp32 rows (the kernel's arithmetic), and the data's own statistics
    n, m, m2 = rows.double().unbind(1)
    mean = (n * m).sum(0) / n.sum(0)
    var = (m2.sum(0) + (n * (m - mean) ** 2).sum(0)) / n.sum(0)
    torch.testing.assert_close(out[0].double(), mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(out[1].double(), var, rtol=1e-5, atol=0)
    torch.testing.assert_close(out[1].double(), whole.var(0, unbiased=False), rtol=1e-3, atol=0)  # fp32 rows
    scale = gamma.double() / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(out[2].double(), scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(out[3].double(), beta.double() - mean * scale, rtol=1e-4, atol=1e-3)  # 1000*scale
    torch.testing.assert_close(rm.double(), 0.9 * rm0.double() + 0.1 * mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double(), 0.9 * rv0.double() + 0.1 * var * 20 / 19, rtol=1e-5, atol=1e-6)
    assert nbt.item() == 5
    # a group whose ranks are all empty: counted, statistics left alone (as an empty batch)
    rm1, rv1 = rm.clone(), rv.clone()
    empty = torch.zeros(2, 3, C)
    bn_finalize_kernel[(1,)](*out, empty, empty, gamma, beta, rm, rv, nbt, 2, C, 0, 1, 0.1, 1e-5,
                             AFFINE=True, UPDATE=True, CUMULATIVE=False, COUNT=True, BLOCK_T=32, BLOCK_C=8,
                             ROW_COUNTS=True)
    assert nbt.item() == 6 and torch.equal(rm, rm1) and torch.equal(rv, rv1)


@pytest.mark.parametrize("M", [37, 0], ids=["rows", "empty_rank"])
def test_rank_row_of_tile_partials_matches_float64(M):
    """MERGED_OUT: a rank's tile partials [T, C] -> its (count, mean, M2) row; an empty rank
    (no tiles) writes a zero row."""
    C, rows_per_block = 6, 16
    g = torch.Generator().manual_seed(4)
    z = torch.randn(M, C, generator=g, dtype=torch.float64) * 2.0 + 50.0
    tiles = list(z.split(rows_per_block)) if M else []  # (an empty tensor splits into one empty piece)
    part_mean = torch.stack([t.mean(0) for t in tiles]).float() if tiles else torch.zeros(0, C)
    part_m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles]).float() if tiles else torch.zeros(0, C)
    local = torch.full((3, C), float("nan"))
    scratch = [torch.full((C,), float("nan")) for _ in range(3)]
    bn_finalize_kernel[(1,)](local, *scratch, part_mean, part_m2, *[scratch[0]] * 5, len(tiles), C, M,
                             rows_per_block, 0.0, 1e-5, AFFINE=False, UPDATE=False, CUMULATIVE=False, COUNT=False,
                             BLOCK_T=32, BLOCK_C=8, MERGED_OUT=True)
    expected = _rank_rows([z], C)[0]
    torch.testing.assert_close(local.double(), expected, rtol=1e-5, atol=1e-5)


def test_convert_replaces_sync_batchnorm_with_same_tensors():
    net = nn.SyncBatchNorm.convert_sync_batchnorm(make_net())
    keys = {k: v for k, v in net.state_dict().items()}
    params = {n: p for n, p in net.named_parameters()}
    model = resnext.convert(net)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert sum(isinstance(m, resnext.SyncBatchNorm2d) for m in model.modules()) == N_BN
    assert model.state_dict().keys() == keys.keys()
    for n, p in model.named_parameters():
        assert p is params[n], n  # the same tensors: optimizers keep working
    for k, v in model.state_dict().items():
        assert v.data_ptr() == keys[k].data_ptr(), k
    assert isinstance(model.body, resnext.FusedSequential)
    assert isinstance(model.body[3], resnext.FusedBottleneck)


def test_sync_batchnorm2d_without_process_group_is_batchnorm():
    """No initialised process group (or a group of one): plain BatchNorm, as nn.SyncBatchNorm."""
    assert not dist.is_initialized()
    ref = make_net()
    ours = resnext.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)))
    x = torch.randn(2, *SHAPE)
    assert_close(ours(x), ref(x), 1e-4, "output")
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert_close(a.float(), b.float(), 1e-4, name)
