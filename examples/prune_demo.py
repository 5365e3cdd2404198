"""Prune a small two-task CNN with component-wise soft thresholds on a toy problem.

Task "mask": per-pixel foreground of random blobs; task "count": how many blobs. The backbone is shared,
each head has its own threshold, and the coupled weight decay on the thresholds (SPEC §3) drives sparsity
up while the losses go down.

    python examples/prune_demo.py [--steps 300]
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import adapmtl


class TwoTaskNet(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({
            "mask": nn.Conv2d(width, 1, 1),
            "count": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 1)),
        })

    def components(self):
        return {"backbone": self.backbone, **self.heads}

    def forward(self, x):
        f = self.backbone(x)
        return {name: head(f) for name, head in self.heads.items()}


def batch(n, size, gen):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    counts = torch.randint(1, 5, (n,), generator=gen)
    mask = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(int(counts[i])):
            cy, cx = torch.randint(0, size, (2,), generator=gen)
            r = 2 + torch.rand((), generator=gen) * 4
            mask[i, 0] = torch.maximum(mask[i, 0], (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float())
    image = mask + 0.3 * torch.randn(mask.shape, generator=gen)
    return image, {"mask": mask, "count": counts.float().unsqueeze(1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--init", type=float, default=-6.0, help="initial threshold parameter s0")
    parser.add_argument("--weight-decay", type=float, default=5e-3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TwoTaskNet()
    adapmtl.sparsify(model, init=args.init, mode="component")
    # SPEC §3: Adam, betas (0.5, 0.999), coupled weight decay on every parameter, thresholds included.
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.999), weight_decay=args.weight_decay)
    bar = tqdm(range(args.steps), desc="training")
    first = None
    for step in bar:
        x, y = batch(16, 32, gen)
        out = model(x)
        losses = {
            "mask": F.binary_cross_entropy_with_logits(out["mask"], y["mask"]),
            "count": F.smooth_l1_loss(out["count"], y["count"]),
        }
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss)
        live = adapmtl.live_sparsity(model)
        bar.set_postfix(loss=f"{float(loss):.3f}", sparsity=f"{100 * float(live.overall):.1f}%")
    print(f"\nloss {first:.3f} -> {float(loss):.3f}\n")
    print(adapmtl.sparsity_report(model))


if __name__ == "__main__":
    main()
