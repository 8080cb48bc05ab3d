"""Train a converted ResNeXt with SyncBatchNorm under DistributedDataParallel.

One process per GPU (NCCL), or per CPU worker (gloo); BatchNorm statistics are those of the
whole global batch (``nn.SyncBatchNorm`` semantics, merged inside the fused kernels: one
all-gather of [3, C] per BN forward, one all-reduce of [2C + 1] per BN backward).

    # one node, 8 GPUs
    torchrun --nproc_per_node=8 -m resnext.examples.train_ddp --arch resnext50_32x4d --batch 64 --steps 100
    # two nodes (run on each, node_rank 0 and 1)
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST0 --master_port=29500 --nproc_per_node=8 \\
        -m resnext.examples.train_ddp --arch resnext101_32x4d --batch 32
    # CPU, gloo, tiny model and data (what CI runs; TRITON_INTERPRET=1 runs the kernels)
    torchrun --nproc_per_node=2 -m resnext.examples.train_ddp --tiny --steps 2

The data are random images and labels: put a real ``DataLoader`` with a
``DistributedSampler`` in ``batches()``.  ``--out`` writes each rank's losses and a checksum
of its parameters (DDP keeps the replicas equal) as JSON.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import resnext

ARCHS = ("resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="resnext50_32x4d")
    p.add_argument("--tiny", action="store_true", help="a 4-stage ResNeXt with 16 base channels, 16x16 images")
    p.add_argument("--batch", type=int, default=None, help="images per rank (default 32, --tiny 2)")
    p.add_argument("--image-size", type=int, default=None, help="default 224, --tiny 16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--backend", default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    p.add_argument("--out", default=None, help="a directory: rank<r>.json with losses and a parameter checksum")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 32)
    args.image_size = args.image_size or (16 if args.tiny else 224)
    return args


def build(args) -> nn.Module:
    if args.tiny:
        model = resnext.ResNet([1, 1, 1, 1], num_classes=10, groups=4, width_per_group=4, base_channels=16)
    else:
        model = getattr(resnext, args.arch)(fused=False)
    # SyncBatchNorm first, then convert: every BN becomes a resnext.SyncBatchNorm2d (the same
    # tensors; not an nn.SyncBatchNorm, which DDP refuses on the CPU), fused where it can be.
    return resnext.convert(nn.SyncBatchNorm.convert_sync_batchnorm(model))


def batches(args, rank: int, device, num_classes: int):
    g = torch.Generator().manual_seed(1234 + rank)  # each rank its own data
    for _ in range(args.steps):
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
        y = torch.randint(0, num_classes, (args.batch,), generator=g)
        yield x.to(device, memory_format=torch.channels_last), y.to(device)


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group(args.backend or ("nccl" if cuda else "gloo"))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)
        # channels_last inputs; the weights stay as they are (the kernels pack their own copy, and
        # DDP's gradient buckets then match the gradients' strides)
        model = build(args).to(device).train()
        num_classes = model.fc.out_features
        ddp = DDP(model, device_ids=[local_rank] if cuda else None)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        losses = []
        for step, (x, y) in enumerate(batches(args, rank, device, num_classes)):
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if rank == 0:
                print(f"step {step}: loss {losses[-1]:.4f} (rank 0 of {world})", flush=True)
        if args.out:
            with torch.no_grad():
                checksum = sum(p.double().sum().item() for p in model.parameters())
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
                json.dump(dict(rank=rank, world=world, losses=losses, param_checksum=checksum,
                               sync_bns=sum(isinstance(m, resnext.SyncBatchNorm2d) for m in model.modules()),
                               torch_sync_bns=sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())), f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
