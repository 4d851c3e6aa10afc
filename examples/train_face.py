"""Face-recognition training as insightface's arcface_torch does it, small enough for a laptop CPU.

    python examples/train_face.py                                   # synthetic faces, about 2.5 min on 2 cores
    python examples/train_face.py --head naive                      # the same with the naive Circle Loss
    python examples/train_face.py --num-classes 100000 --steps 20   # a large class matrix: time per step
    python examples/train_face.py --data DIR                        # your images, one folder per identity
    torchrun --nproc_per_node 2 examples/train_face.py              # DDP backbone, class matrix sharded

A ResNet-style backbone maps face images to unit embeddings; the head is Circle Loss over the class
matrix (circleloss_ext.CircleLoss, fused; ShardedCircleLoss under torchrun; `--head naive` for the
naive formulation, which holds the B × C matrices). SGD with momentum, linear warm-up then polynomial
decay (arcface_torch's PolyScheduler), AMP (`--amp`: bf16 on CPUs, fp16 with a grad scaler on GPUs;
default on GPUs only), a checkpoint every `--save-every` steps and at the end (`--checkpoint PATH`,
`--resume` continues from it), a progress bar and a log line every `--log-every` steps with the loss,
the training accuracy (the share of the batch whose own class has the highest cosine, from the fused
forward) and samples per second.

Data: `--data DIR` reads an image folder in insightface's one-folder-per-identity layout (any image
Pillow opens, resized to --image-size); the last `--eval-identities` folders are held out. Without
it, a synthetic face-like set is drawn on the fly: each identity is a point in a 24-dimensional code
space rendered through fixed smooth basis images on top of a face template (oval, eyes, brows, nose,
mouth), and each sample adds pose jitter, an intra-identity change of the code, lighting (gain and a
gradient) and pixel noise; identities past --num-classes are never trained on and serve evaluation.

Evaluation, on the held-out identities, as LFW's 1:1 verification: 3000 same-identity and 3000
different-identity pairs, 10 folds, each scored at the threshold that is best on the other nine
(`verification_accuracy`); TAR at FAR = 1e-3 over all pairs of the held-out images
(`tar_at_far_1e-3`); the ROC curve saved as a PNG (`--roc PATH`, when matplotlib is installed).
`--json PATH` writes these with `samples_per_second` and `final_loss`.
"""
import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import circleloss_ext
from circleloss_ext.distributed import ShardedCircleLoss


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="image folder, one subfolder per identity (default: synthetic)")
    parser.add_argument("--num-classes", type=int, default=2000, help="training identities (default 2000)")
    parser.add_argument("--steps", type=int, default=700, help="SGD steps (default 700)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step and process (default 128)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the square images (default 32)")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--head", choices=["fused", "naive"], default="fused",
                        help="fused Circle Loss (default) or the naive formulation (single process only)")
    parser.add_argument("--m", type=float, default=0.25)
    parser.add_argument("--gamma", type=float, default=64.0)
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sampling under torchrun")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps (default 50)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: on for CUDA, off on CPUs)")
    parser.add_argument("--eval-identities", type=int, default=200, help="held-out identities (default 200)")
    parser.add_argument("--eval-samples", type=int, default=8, help="images per held-out identity (default 8)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint path (per rank under torchrun)")
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--roc", default=None, help="save the ROC curve of the verification here (PNG)")
    parser.add_argument("--json", default=None, help="write a summary of the run here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- data

# How much a sample moves away from its identity: the change of its code (relative to the spread of
# identities, 1) and the pixel noise (the face spans about 1). Chosen so that an untrained backbone
# verifies at ~58% and the default run has to learn for its ≥ 90%.
INTRA_IDENTITY, PIXEL_NOISE = 0.7, 0.15


class SyntheticFaces:
    """Face-like images of any number of identities, drawn on the fly (see the module docstring)."""

    CODE_DIM = 24

    def __init__(self, image_size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.size = image_size
        self.seed = seed
        coarse = torch.randn(self.CODE_DIM, 3, 6, 6, generator=gen)
        self.basis = F.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False)
        self.basis = self.basis / self.basis.flatten(1).norm(dim=1)[:, None, None, None] * image_size / 4
        self.template = self._template(image_size)
        y = torch.linspace(-1, 1, image_size)
        self.gradient = y[None, :].expand(image_size, image_size)  # left-to-right lighting

    @staticmethod
    def _template(size):
        y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")

        def blob(cx, cy, sx, sy):
            return torch.exp(-((x - cx) / sx) ** 2 - ((y - cy) / sy) ** 2)

        face = (((x / 0.75) ** 2 + (y / 0.95) ** 2) < 1).float() * 0.6
        features = (blob(-0.33, -0.2, 0.14, 0.08) + blob(0.33, -0.2, 0.14, 0.08)  # eyes
                    + 0.6 * blob(-0.33, -0.42, 0.2, 0.04) + 0.6 * blob(0.33, -0.42, 0.2, 0.04)  # brows
                    + 0.5 * blob(0.0, 0.1, 0.06, 0.2) + blob(0.0, 0.5, 0.3, 0.07))  # nose, mouth
        skin = torch.tensor([0.9, 0.7, 0.6])[:, None, None]
        return skin * (face - 0.5 * features)

    def codes(self, identities: torch.Tensor) -> torch.Tensor:
        """The identities' codes: a fixed function of (seed, identity)."""
        out = torch.empty(len(identities), self.CODE_DIM)
        for row, identity in enumerate(identities.tolist()):
            out[row] = torch.randn(self.CODE_DIM, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + 7919 * identity + 1))
        return out

    def render(self, codes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One image per code, with this sample's pose, expression, lighting and noise: (n, 3, s, s)."""
        n = codes.shape[0]
        varied = codes + INTRA_IDENTITY * torch.randn(codes.shape, generator=gen)
        images = self.template + torch.einsum("nk,kchw->nchw", varied, self.basis) * 0.25
        gain = 1 + 0.2 * torch.randn(n, 1, 1, 1, generator=gen)
        slope = 0.15 * torch.randn(n, 1, 1, 1, generator=gen)
        images = images * gain + slope * self.gradient
        shifts = torch.randint(-2, 3, (n, 2), generator=gen)
        images = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(images, shifts)])
        return images + PIXEL_NOISE * torch.randn(images.shape, generator=gen)


class SyntheticData:
    """Training batches of identities [0, num_classes), evaluation images of the identities after them."""

    def __init__(self, num_classes, image_size, eval_identities, eval_samples, seed):
        self.faces = SyntheticFaces(image_size, seed)
        self.num_classes = num_classes
        self.train_codes = self.faces.codes(torch.arange(num_classes))
        self.eval_identities, self.eval_samples = eval_identities, eval_samples

    def batch(self, size, gen):
        labels = torch.randint(0, self.num_classes, (size,), generator=gen)
        return self.faces.render(self.train_codes[labels], gen), labels

    def evaluation_set(self):
        identities = torch.arange(self.num_classes, self.num_classes + self.eval_identities)
        labels = identities.repeat_interleave(self.eval_samples)
        gen = torch.Generator().manual_seed(12345)
        return self.faces.render(self.faces.codes(identities).repeat_interleave(self.eval_samples, 0), gen), labels


class FolderData:
    """An insightface-style image folder: DIR/<identity>/<image>. The last eval_identities folders
    (sorted by name) are held out; the others are the training classes."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, root, image_size, eval_identities, eval_samples):
        from PIL import Image  # Pillow comes with matplotlib
        self.Image, self.size = Image, image_size
        folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if len(folders) <= eval_identities:
            raise SystemExit(f"--data {root}: {len(folders)} identity folders, need more than --eval-identities "
                             f"{eval_identities}")
        self.files = []
        for label, folder in enumerate(folders):
            names = sorted(n for n in os.listdir(os.path.join(root, folder)) if n.lower().endswith(self.EXTENSIONS))
            self.files.append([os.path.join(root, folder, n) for n in names])
        self.num_classes = len(folders) - eval_identities
        self.train = [(path, label) for label in range(self.num_classes) for path in self.files[label]]
        self.eval_samples = eval_samples

    def load(self, path):
        image = self.Image.open(path).convert("RGB").resize((self.size, self.size))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return pixels.permute(2, 0, 1).float() / 127.5 - 1.0

    def batch(self, size, gen):
        picks = torch.randint(0, len(self.train), (size,), generator=gen).tolist()
        images = torch.stack([self.load(self.train[i][0]) for i in picks])
        flip = torch.rand(size, generator=gen) < 0.5
        images[flip] = images[flip].flip(-1)
        return images, torch.tensor([self.train[i][1] for i in picks])

    def evaluation_set(self):
        images, labels = [], []
        for label in range(self.num_classes, len(self.files)):
            for path in self.files[label][:self.eval_samples]:
                images.append(self.load(path))
                labels.append(label)
        return torch.stack(images), torch.tensor(labels)


# ---------------------------------------------------------------- model


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Backbone(nn.Module):
    """A small iResNet-like network: a stem, three stages of one basic block (stride 2 after the first),
    then arcface_torch's output layer (BN, flatten, linear, BN) to the embedding."""

    def __init__(self, image_size, embedding_dim, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(BasicBlock(cin, width, 1 if i == 0 else 2))
            cin = width
        self.stages = nn.Sequential(*stages)
        side = image_size // 2 ** (len(widths) - 1)
        self.output = nn.Sequential(nn.BatchNorm2d(cin), nn.Flatten(), nn.Linear(cin * side * side, embedding_dim),
                                    nn.BatchNorm1d(embedding_dim))

    def forward(self, x):
        return self.output(self.stages(self.stem(x)))


# ---------------------------------------------------------------- evaluation


def embed(backbone, images, device, batch=256):
    backbone.eval()
    with torch.no_grad():
        out = torch.cat([backbone(images[i:i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)])
    backbone.train()
    return F.normalize(out)


def verification(embeddings, labels, roc_path=None, seed=0):
    """LFW-style 1:1 verification on held-out identities: (10-fold pair accuracy, TAR at FAR = 1e-3)."""
    scores = embeddings @ embeddings.T
    same = labels[:, None] == labels[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    positive, negative = scores[same & upper], scores[~same & upper]
    threshold = torch.quantile(negative, 1 - 1e-3) if negative.numel() < 16_000_000 else negative.kthvalue(
        int(negative.numel() * (1 - 1e-3))).values
    tar = (positive > threshold).float().mean().item()

    gen = torch.Generator().manual_seed(seed)
    count = min(3000, positive.numel(), negative.numel())
    pairs = torch.cat([positive[torch.randperm(positive.numel(), generator=gen)[:count]],
                       negative[torch.randperm(negative.numel(), generator=gen)[:count]]])
    truth = torch.cat([torch.ones(count, dtype=torch.bool), torch.zeros(count, dtype=torch.bool)])
    order = torch.randperm(2 * count, generator=gen)
    pairs, truth = pairs[order], truth[order]
    folds = torch.arange(2 * count) % 10
    accuracies = []
    for fold in range(10):
        train, test = folds != fold, folds == fold
        candidates = pairs[train].sort().values
        correct = ((pairs[train][None, :] > candidates[:, None]) == truth[train][None, :]).float().mean(dim=1)
        best = candidates[correct.argmax()]
        accuracies.append(((pairs[test] > best) == truth[test]).float().mean().item())
    if roc_path:
        save_roc(positive, negative, roc_path)
    return sum(accuracies) / len(accuracies), tar


def save_roc(positive, negative, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no ROC plot at {path}", file=sys.stderr)
        return
    thresholds = torch.linspace(-1, 1, 2001)
    tar = (positive[None, :] > thresholds[:, None]).float().mean(dim=1)
    far = torch.stack([(negative > t).float().mean() for t in thresholds])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(far.clamp_min(1e-6), tar)
    ax.set_xscale("log")
    ax.set_xlim(1e-5, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("1:1 verification, held-out identities")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- training


class Progress:
    """tqdm when it is installed, else nothing between the log lines."""

    def __init__(self, total, initial, enabled):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, **fields):
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)

    def write(self, line):
        (self.bar.write if self.bar is not None else print)(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def learning_rate(step, args):
    """Linear warm-up, then polynomial decay (power 2) to 0, as arcface_torch's PolyScheduler."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (1 - (step - args.warmup) / max(1, args.steps - args.warmup)) ** 2


def checkpoint_path(args, rank, world_size):
    return args.checkpoint if world_size == 1 else f"{args.checkpoint}.rank{rank}"


def main(argv=None):
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if distributed:
        if args.head == "naive":
            raise SystemExit("--head naive runs in a single process; under torchrun the head is ShardedCircleLoss")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    rank = dist.get_rank() if distributed else 0
    amp = device.type == "cuda" if args.amp is None else args.amp
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    if args.data:
        data = FolderData(args.data, args.image_size, args.eval_identities, args.eval_samples)
    else:
        data = SyntheticData(args.num_classes, args.image_size, args.eval_identities, args.eval_samples, args.seed)
    num_classes = data.num_classes

    torch.manual_seed(args.seed)
    backbone = Backbone(args.image_size, args.embedding_dim).to(device)
    if distributed:
        backbone = nn.parallel.DistributedDataParallel(backbone)
        head = ShardedCircleLoss(num_classes, args.embedding_dim, m=args.m, gamma=args.gamma,
                                 sample_rate=args.sample_rate, track_accuracy=True, device=device)
    else:
        head = circleloss_ext.CircleLoss(num_classes, args.embedding_dim, m=args.m, gamma=args.gamma,
                                         track_accuracy=True, device=device,
                                         backend="auto" if args.head == "fused" else "reference")
    optimizer = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=args.lr,
                                momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    start = 0
    path = checkpoint_path(args, rank, world_size) if args.checkpoint else None
    if args.resume and path and os.path.exists(path):
        state = torch.load(path, map_location=device)
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        if rank == 0:
            print(f"resumed from {path} at step {start}")

    def save(step):
        if path:
            torch.save({"backbone": backbone.state_dict(), "head": head.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step, "args": vars(args)}, path)

    if rank == 0:
        print(f"{'synthetic faces' if not args.data else args.data}: {num_classes} identities, "
              f"{args.image_size}x{args.image_size}, batch {args.batch_size} x {world_size} process(es), "
              f"head {'sharded fused' if distributed else args.head}, amp {amp}, device {device}")
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank + start)
    progress = Progress(args.steps, start, enabled=rank == 0)
    timed_samples, timed_seconds, loss_value, accuracy = 0, 0.0, float("nan"), float("nan")
    for step in range(start, args.steps):
        images, labels = data.batch(args.batch_size, gen)
        images, labels = images.to(device), labels.to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = head(backbone(images), labels)  # under autocast the head's products too; its weight stays fp32
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_value, accuracy = loss.item(), head.last_accuracy.item()
        if step - start >= 3:  # after warm-up of the allocator and the kernels
            timed_samples += args.batch_size * world_size
            timed_seconds += time.perf_counter() - began
        progress.update(loss=f"{loss_value:.3f}", acc=f"{accuracy:.2f}")
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            rate = timed_samples / timed_seconds if timed_seconds else float("nan")
            progress.write(f"step {step + 1:5d}  loss {loss_value:.4f}  accuracy {accuracy:.3f}  "
                           f"lr {learning_rate(step, args):.4f}  {rate:.0f} samples/s")
        if path and (step + 1) % args.save_every == 0:
            save(step + 1)
    progress.close()
    save(args.steps)

    summary = {"steps": args.steps, "num_classes": num_classes, "head": "sharded" if distributed else args.head,
               "processes": world_size, "samples_per_second": timed_samples / timed_seconds if timed_seconds else None,
               "final_loss": loss_value, "final_training_accuracy": accuracy}
    if rank == 0:
        images, labels = data.evaluation_set()
        model = backbone.module if distributed else backbone
        summary["verification_accuracy"], summary["tar_at_far_1e-3"] = verification(
            embed(model, images, device), labels, args.roc)
        rate = summary["samples_per_second"]
        print(f"held-out identities: {len(labels.unique())}, images {len(labels)}: verification accuracy "
              f"{summary['verification_accuracy']:.4f}, TAR {summary['tar_at_far_1e-3']:.4f} at FAR 1e-3"
              + (f"; {rate:.0f} samples/s" if rate else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
