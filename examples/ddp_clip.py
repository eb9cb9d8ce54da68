"""Train a tiny two-tower model with DDP and fastcl's gathered-negatives CLIP loss.

    torchrun --nproc_per_node=2 examples/ddp_clip.py                  # CPU: gloo
    torchrun --nproc_per_node=8 examples/ddp_clip.py --gather ring    # GPUs: NCCL

Every rank draws its own batch of synthetic pairs: an "image" is a random vector and its "text" a
fixed random linear map of it plus noise, so the towers can learn to align them. Each rank's
images are contrasted with the texts of every rank (the global batch), with the exact gradient:
DDP's averaging over ranks gives the single-process gradient of the loss over the global batch,
for the towers and for the logit scale alike.
"""

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastcl


class TwoTower(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, hidden: int):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(image_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.text = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initialisation

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.logit_scale.exp())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per rank")
    parser.add_argument("--image-dim", type=int, default=64)
    parser.add_argument("--text-dim", type=int, default=48)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--gather", choices=fastcl.distributed.GATHER_MODES, default="all_gather")
    parser.add_argument("--local-loss", action="store_true",
                        help="return the local anchors' share (open_clip's local_loss)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # the loss's collectives on their own group, apart from DDP's gradient all-reduces
    loss_group = dist.new_group()

    torch.manual_seed(args.seed)  # same model and text map on every rank (DDP also broadcasts)
    text_map = torch.randn(args.image_dim, args.text_dim, device=device) / math.sqrt(args.image_dim)
    model = DistributedDataParallel(TwoTower(args.image_dim, args.text_dim, args.embed_dim, args.hidden).to(device),
                                    device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank + 1)  # a different batch per rank

    if rank == 0:
        print(f"{world} ranks on {device.type} ({dist.get_backend()}), {args.batch_size} pairs per rank, "
              f"global batch {world * args.batch_size}, gather={args.gather}, local_loss={args.local_loss}", flush=True)
    window_start, window_steps = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        images = torch.randn(args.batch_size, args.image_dim, device=device, generator=data)
        noise = torch.randn(args.batch_size, args.text_dim, device=device, generator=data)
        texts = images @ text_map + 0.3 * noise

        image_emb, text_emb, scale = model(images, texts)
        loss = fastcl.clip_loss(image_emb, text_emb, scale, group=loss_group, gather=args.gather,
                                local_loss=args.local_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.module.logit_scale.clamp_(0, math.log(100))
        window_steps += 1

        if step % args.log_every == 0 or step == args.steps:
            global_loss = loss.detach().clone()
            if args.local_loss:  # the shares average to the global loss
                dist.all_reduce(global_loss)
                global_loss /= world
            if use_cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            if rank == 0:
                print(f"step {step:4d}  loss {global_loss.item():.4f}  logit_scale {scale.item():6.2f}  "
                      f"{window_steps * world * args.batch_size / elapsed:9.0f} pairs/s  "
                      f"{1000 * elapsed / window_steps:7.1f} ms/step", flush=True)
            window_start, window_steps = time.perf_counter(), 0
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
