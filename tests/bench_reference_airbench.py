"""The reference for train_cnn on CIFAR-10: airbench94, reimplemented in PyTorch from its published settings.

airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU",
arXiv:2404.00498, 2024; github.com/KellerJordan/cifar10-airbench,
legacy/airbench94.py) reaches 94.01% on CIFAR-10's test set in 0.36 PFLOP
of training, from the binary CIFAR-10. This file trains the same recipe on
the same JPEG copy of CIFAR-10 the pipeline reads, at the same budget of
training FLOPs, so that train_cnn is compared with it on equal terms: same
images, same budget, same device, in the same session.

The recipe, with its published settings:

- network: a 2x2 whitening convolution (24 filters: the eigenvectors of the
  training images' 2x2 patch covariance, and their negatives; fixed, with a
  bias trained for the first 3 epochs), GELU, then three blocks of widths 64,
  256, 256, each conv3x3 - maxpool 2 - batch norm - GELU - conv3x3 - batch
  norm - GELU, then maxpool 3, a linear layer without bias and a factor 1/9
  on its logits. Convolutions start with the identity on their first input
  channels (Dirac). Batch norm: momentum 0.6 (PyTorch's 0.4), epsilon 1e-12,
  no scale, a learnt offset;
- optimizer: SGD with Nesterov momentum 0.85 at batch size 1024, learning
  rate 11.5 and weight decay 0.0153 per 1,024 images, both in decoupled form
  (divided by 1,024 x (1 + 1 / (1 - momentum))); batch-norm offsets learn
  64x faster; label smoothing 0.2; the loss summed over the batch;
- schedule: the rate rises linearly from 0.2 to 1 of its peak over the
  first 23% of the steps, then falls linearly to 0.07;
- lookahead: every 5 steps, the average of every weight and batch-norm
  statistic moves towards the network by 1 - 0.95**5 x (step / steps)**3, and
  the network is reset to it; at the end the network is the average;
- augmentation: each image is mirrored on every other epoch (which half
  starts mirrored is random), and moved by up to 2 pixels (reflected edges);
- test: the mean of the predictions for the image and its mirror image, and
  for both moved by one pixel up-left and down-right (six views).

Training FLOPs are 3 forward passes per training image (as imgcls/flops.py
counts train_cnn's), counted from the network's own layers (236 MFLOP a
forward pass); the budget decides the number of steps (10.2 epochs at 0.36
PFLOP on 50,000 images; airbench94 runs 9.9). Evaluation is not counted.

It needs PyTorch (`pip install torch`; not a dependency of the project). On a
GPU it trains in bfloat16 autocast (the paper: float16), on a CPU in float32.

    python tests/bench_reference_airbench.py [--data ../shared/data/datasets/cifar10-jpeg.tar.gz]
                                             [--budget 0.36] [--seeds 0,1,2,3] [--device cuda]
"""

import argparse
import io
import json
import math
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError:
    raise SystemExit("this benchmark needs PyTorch: pip install torch") from None

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/datasets/cifar10-jpeg.tar.gz"

# airbench94's published settings (see the module docstring).
BATCH_SIZE = 1024
LEARNING_RATE = 11.5  # per 1,024 images, decoupled from the momentum
MOMENTUM = 0.85
WEIGHT_DECAY = 0.0153  # per 1,024 images, decoupled from the learning rate
BIAS_RATE_FACTOR = 64.0  # batch-norm offsets
LABEL_SMOOTHING = 0.2
WHITEN_BIAS_EPOCHS = 3
WIDTHS = (64, 256, 256)
BATCH_NORM_MOMENTUM = 0.6  # of the old statistics: PyTorch's momentum is 1 - this
LOGIT_SCALE = 1 / 9
TRANSLATE = 2
WARMUP_SHARE, START, END = 0.23, 0.2, 0.07
LOOKAHEAD_EVERY, LOOKAHEAD_DECAY, LOOKAHEAD_POWER = 5, 0.95 ** 5, 3
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_cifar(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": ...} from a tar of train/<class>/*.jpg and test/<class>/*.jpg.

    Images are uint8, (N, 32, 32, 3); labels index the sorted class names.
    """
    pixels = {"train": [], "test": []}
    names = {"train": [], "test": []}
    with tarfile.open(path) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] not in pixels:
                continue
            with Image.open(io.BytesIO(archive.extractfile(member).read())) as image:
                pixels[parts[0]].append(np.asarray(image.convert("RGB")))
            names[parts[0]].append(parts[1])
    classes = sorted(set(names["train"]))
    return {split: (np.stack(pixels[split]), np.array([classes.index(name) for name in names[split]]))
            for split in pixels}


def block(channels_in: int, channels_out: int) -> nn.Sequential:
    """conv - maxpool 2 - batch norm - GELU - conv - batch norm - GELU."""
    return nn.Sequential(conv3x3(channels_in, channels_out), nn.MaxPool2d(2), batch_norm(channels_out), nn.GELU(),
                         conv3x3(channels_out, channels_out), batch_norm(channels_out), nn.GELU())


def conv3x3(channels_in: int, channels_out: int) -> nn.Conv2d:
    """A 3x3 convolution without bias, PyTorch's random start, and the identity on its first input channels."""
    layer = nn.Conv2d(channels_in, channels_out, 3, padding="same", bias=False)
    with torch.no_grad():
        nn.init.dirac_(layer.weight[:channels_in])
    return layer


def batch_norm(channels: int) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - BATCH_NORM_MOMENTUM)
    layer.weight.requires_grad = False  # no learnt scale: it stays 1
    return layer


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, inputs):
        return inputs * self.factor


def build_network(whitening_images: torch.Tensor) -> nn.Sequential:
    """airbench94's network, its whitening filters computed from `whitening_images` (normalised, NCHW)."""
    whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    with torch.no_grad():
        whiten.weight.copy_(whitening_filters(whitening_images))
        whiten.bias.zero_()
    whiten.weight.requires_grad = False
    return nn.Sequential(whiten, nn.GELU(), block(24, WIDTHS[0]), block(WIDTHS[0], WIDTHS[1]),
                         block(WIDTHS[1], WIDTHS[2]), nn.MaxPool2d(3), nn.Flatten(),
                         nn.Linear(WIDTHS[2], 10, bias=False), Scale(LOGIT_SCALE))


def whitening_filters(images: torch.Tensor, epsilon: float = 5e-4) -> torch.Tensor:
    """12 filters that decorrelate the 2x2 patches of `images` (scaled by 1 / sqrt(eigenvalue)), and their negatives."""
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H', W', 2, 2
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = (eigenvectors / torch.sqrt(eigenvalues + epsilon)).T.reshape(12, 3, 2, 2).float()
    return torch.cat([filters, -filters])


def forward_flops(network: nn.Module, device: str) -> int:
    """FLOPs of one image's forward pass through the convolutions and the linear layer (2 per multiply-add)."""
    total = 0

    def count(layer, inputs, output):
        nonlocal total
        fan_in = layer.weight[0].numel()  # inputs per output value
        total += 2 * fan_in * output[0].numel()

    hooks = [layer.register_forward_hook(count) for layer in network.modules()
             if isinstance(layer, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        network.eval()(torch.zeros(1, 3, 32, 32, device=device))
    for hook in hooks:
        hook.remove()
    return total


def translated(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to TRANSLATE pixels in each direction, its edges reflected."""
    count, _, height, width = images.shape
    padded = F.pad(images, (TRANSLATE,) * 4, mode="reflect")
    shifts = torch.randint(0, 2 * TRANSLATE + 1, (2, count), generator=generator).to(images.device)
    rows = (shifts[0][:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    columns = (shifts[1][:, None] + torch.arange(width, device=images.device))[:, None, None, :]
    return padded[torch.arange(count, device=images.device)[:, None, None, None],
                  torch.arange(3, device=images.device)[None, :, None, None], rows, columns]


def relative_rate(step: int, steps: int) -> float:
    """The learning rate at `step` as a fraction of the peak: up from START, then down to END."""
    warmup = int(steps * WARMUP_SHARE)
    if step < warmup:
        return START + (1 - START) * step / warmup
    return 1 + (END - 1) * (step - warmup) / (steps - warmup)


def optimizer_for(network: nn.Sequential) -> torch.optim.SGD:
    """Nesterov SGD with airbench's decoupled rate and decay; the batch-norm offsets learn 64x faster."""
    scale = 1024 * (1 + 1 / (1 - MOMENTUM))
    rate, decay = LEARNING_RATE / scale, WEIGHT_DECAY * BATCH_SIZE / scale
    offsets = [parameter for layer in network.modules() if isinstance(layer, nn.BatchNorm2d)
               for parameter in (layer.bias,)]
    others = [parameter for parameter in network.parameters()
              if parameter.requires_grad and all(parameter is not offset for offset in offsets)]
    # PyTorch multiplies the decay by the rate: dividing keeps each step's decay at `decay` for both groups.
    groups = [{"params": offsets, "lr": rate * BIAS_RATE_FACTOR, "weight_decay": decay / (rate * BIAS_RATE_FACTOR)},
              {"params": others, "lr": rate, "weight_decay": decay / rate}]
    return torch.optim.SGD(groups, momentum=MOMENTUM, nesterov=True)


class Lookahead:
    """The average of every float tensor of the network's state (weights and batch-norm statistics)."""

    def __init__(self, network: nn.Module):
        self.average = {name: value.detach().clone() for name, value in network.state_dict().items()}

    def reset(self, network: nn.Module, decay: float) -> None:
        """Move the average 1 - decay of the way to the network, then set the network to it."""
        for name, value in network.state_dict().items():
            if value.dtype.is_floating_point:
                self.average[name].lerp_(value, 1 - decay)
                value.copy_(self.average[name])


def predict_with_views(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean logits over the image, its mirror image, and both moved by one pixel up-left and down-right."""
    def mirrored(batch):
        return 0.5 * (network(batch) + network(batch.flip(-1)))

    padded = F.pad(images, (1,) * 4, mode="reflect")
    moved = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]
    return 0.5 * mirrored(images) + 0.25 * (mirrored(moved[0]) + mirrored(moved[1]))


def train_once(data: dict, seed: int, budget_flops: float, device: str) -> dict:
    """One training run at the budget; returns its test accuracy (six views and one), epochs, FLOPs and time."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def normalised(pixels: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std

    train_images, train_labels = normalised(data["train"][0]), torch.from_numpy(data["train"][1]).to(device)
    test_images, test_labels = normalised(data["test"][0]), torch.from_numpy(data["test"][1]).to(device)
    started = time.perf_counter()
    network = build_network(train_images[:5000]).to(device)
    flops_per_image = forward_flops(network, device)
    epochs = budget_flops / (3 * flops_per_image * len(train_labels))
    steps_per_epoch = len(train_labels) // BATCH_SIZE
    steps = math.ceil(epochs * steps_per_epoch)
    optimizer = optimizer_for(network)
    lookahead = Lookahead(network)
    loss_function = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING, reduction="sum")
    precision = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # Alternating flips: a random half starts mirrored, and every odd epoch mirrors the whole set.
    start_mirrored = torch.rand(len(train_labels), generator=generator).to(device) < 0.5
    starting = torch.where(start_mirrored[:, None, None, None], train_images.flip(-1), train_images)
    step = 0
    network.train()
    for epoch in range(math.ceil(epochs)):
        network[0].bias.requires_grad = epoch < WHITEN_BIAS_EPOCHS
        images = starting.flip(-1) if epoch % 2 else starting
        order = torch.randperm(len(train_labels), generator=generator).to(device)
        for batch in range(steps_per_epoch):
            if step == steps:
                break
            indices = order[batch * BATCH_SIZE:(batch + 1) * BATCH_SIZE]
            for group in optimizer.param_groups:
                group.setdefault("peak", group["lr"])
                group["lr"] = group["peak"] * relative_rate(step, steps)
            with torch.autocast(device.split(":")[0], dtype=precision, enabled=precision != torch.float32):
                loss = loss_function(network(translated(images[indices], generator)), train_labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % LOOKAHEAD_EVERY == 0:
                lookahead.reset(network, LOOKAHEAD_DECAY * (step / steps) ** LOOKAHEAD_POWER)
    lookahead.reset(network, 1.0)  # the network is the average
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    network.eval()
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=precision, enabled=precision != torch.float32):
        views = torch.cat([predict_with_views(network, batch) for batch in test_images.split(1000)])
        plain = torch.cat([network(batch) for batch in test_images.split(1000)])
    return {"seed": seed, "device": device_name(device),
            "test_accuracy": float((views.argmax(1) == test_labels).float().mean()),
            "test_accuracy_one_view": float((plain.argmax(1) == test_labels).float().mean()),
            "epochs": round(steps / steps_per_epoch, 3), "steps": steps,
            "training_flops": 3 * flops_per_image * BATCH_SIZE * steps, "train_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 as train/<class>/*.jpg, test/…")
    parser.add_argument("--budget", type=float, default=0.36, help="PFLOP of training (airbench94: 0.36)")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=0, help="use only this many training images (a quick check)")
    arguments = parser.parse_args()
    if not arguments.data.exists():
        raise SystemExit(f"{arguments.data}: no such file (pass --data PATH)")
    data = load_cifar(arguments.data)
    if arguments.limit:
        data["train"] = tuple(array[:arguments.limit] for array in data["train"])
    print(f"airbench94 reference on {device_name(arguments.device)}, PyTorch {torch.__version__},"
          f" {len(data['train'][1])} training"
          f" and {len(data['test'][1])} test images, {arguments.budget:g} PFLOP", file=sys.stderr)
    runs = []
    for seed in (int(seed) for seed in arguments.seeds.split(",")):
        runs.append(train_once(data, seed, arguments.budget * 1e15, arguments.device))
        print(json.dumps(runs[-1]), flush=True)
    accuracy = [run["test_accuracy"] for run in runs]
    spread = f" ± {statistics.stdev(accuracy):.2%}" if len(accuracy) > 1 else ""
    print(f"| airbench94 reference, {arguments.budget:g} PFLOP, {runs[0]['device']} |"
          f" {statistics.mean(accuracy):.2%}{spread}"
          f" ({len(runs)} seeds) | {runs[0]['epochs']} epochs | "
          f"{statistics.mean(run['train_seconds'] for run in runs):.1f} s |")


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's (from lscpu, as the other benchmarks name it)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    sys.path.insert(0, str(REPO / "tests"))
    from benchmark import cpu_name

    return cpu_name()


if __name__ == "__main__":
    main()
