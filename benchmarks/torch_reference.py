"""The scse_jax U-Net with scSE blocks in PyTorch: a benchmark-only reference, never a dependency.

    python benchmarks/torch_reference.py --batch 20 --size 256 --device cuda --dtype bfloat16 --modes eager,compile
    python benchmarks/bench.py --compare-torch       # the same steps, alternating with the project's

The network mirrors ``scse_jax.models.unet.UNet`` module by module and name by name (enc1..enc4,
bottleneck, dec4..dec1, head; an SE block after each block of ``se_positions``, named
``<block>_se``), so that ``load_flax_variables`` copies a Flax model's weights in and the two
give the same logits (tests/test_bench.py). One difference that does not change the speed:
BatchNorm's running variance is PyTorch's unbiased one. bfloat16 is autocast (convolutions in
bfloat16, parameters float32), as ``model.compute_dtype=bfloat16`` does in JAX.

The train step is the project's: forward, cross entropy (class weights all one) plus soft
Dice over the batch, backward and an Adam update. Inference is eval-mode class ids. ``--serve``
answers JSON-line requests on stdin, so that ``bench.py --compare-torch`` can time these
steps in turns with its own (see ``serve``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from typing import Any

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # reported by main(); the module stays importable for the message
    torch = None
    nn = None

NUM_CLASSES = 5  # background, liver, right kidney, left kidney, spleen
SE_POSITIONS = ("encoder", "decoder")  # configs/default.py's model.se_positions
DEPTH = 4
LEARNING_RATE = 0.004
DICE_SMOOTH = 1.0
MODES = ("eager", "compile")


def _require_torch() -> None:
    if torch is None:
        raise ModuleNotFoundError(f"PyTorch is not installed for {sys.executable}")


if nn is not None:

    class DoubleConv(nn.Module):
        """(3x3 convolution without bias -> BatchNorm -> ReLU) twice; the first reads the
        channel concatenation of its inputs."""

        def __init__(self, in_channels: int, features: int):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, features, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
            self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)

        def forward(self, *inputs):
            x = torch.cat(inputs, dim=1) if len(inputs) > 1 else inputs[0]
            x = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(x)))

    class ChannelSE(nn.Module):
        def __init__(self, channels: int, reduction: int):
            super().__init__()
            self.squeeze = nn.Linear(channels, max(1, channels // reduction))
            self.excite = nn.Linear(max(1, channels // reduction), channels)

        def forward(self, x):
            gate = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean(dim=(2, 3))))))
            return x * gate[:, :, None, None]

    class SpatialSE(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.squeeze = nn.Conv2d(channels, 1, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.squeeze(x))

    class ChannelSpatialSE(nn.Module):
        """scSE: the element-wise max of cSE and sSE (TMI 2019), or their sum or product."""

        def __init__(self, channels: int, reduction: int, aggregation: str):
            super().__init__()
            self.cse = ChannelSE(channels, reduction)
            self.sse = SpatialSE(channels)
            self.aggregation = aggregation

        def forward(self, x):
            channel, spatial = self.cse(x), self.sse(x)
            if self.aggregation == "max":
                return torch.maximum(channel, spatial)
            return channel + spatial if self.aggregation == "add" else channel * spatial

    class UpBlock(nn.Module):
        """Bilinear x2 (half-pixel centres), a 3x3 convolution with bias, then DoubleConv(skip, up)."""

        def __init__(self, in_channels: int, features: int):
            super().__init__()
            self.up = nn.Conv2d(in_channels, features, 3, padding=1)
            self.conv = DoubleConv(2 * features, features)

        def forward(self, x, skip):
            x = self.up(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
            return self.conv(skip, x)

    class UNet(nn.Module):
        """scse_jax's UNet (bilinear upsampling) in NCHW; returns float32 logits."""

        def __init__(
            self,
            *,
            num_classes: int = NUM_CLASSES,
            features: int = 16,
            se: str = "scse",
            se_reduction: int = 2,
            se_aggregation: str = "max",
            se_positions=SE_POSITIONS,
            in_channels: int = 1,
        ):
            super().__init__()
            self.se_names = []
            width_in = in_channels
            for level in range(1, DEPTH + 1):
                width = features * 2 ** (level - 1)
                setattr(self, f"enc{level}", DoubleConv(width_in, width))
                self._add_se(se, "encoder" in se_positions, f"enc{level}", width, se_reduction, se_aggregation)
                width_in = width
            self.bottleneck = DoubleConv(width_in, features * 2**DEPTH)
            self._add_se(se, "bottleneck" in se_positions, "bottleneck", features * 2**DEPTH, se_reduction,
                         se_aggregation)
            width_in = features * 2**DEPTH
            for level in range(DEPTH, 0, -1):
                width = features * 2 ** (level - 1)
                setattr(self, f"dec{level}", UpBlock(width_in, width))
                self._add_se(se, "decoder" in se_positions, f"dec{level}", width, se_reduction, se_aggregation)
                width_in = width
            self.head = nn.Conv2d(features, num_classes, 1)

        def _add_se(self, kind, wanted, block, channels, reduction, aggregation):
            if not wanted or kind == "none":
                return
            module = {
                "cse": lambda: ChannelSE(channels, reduction),
                "sse": lambda: SpatialSE(channels),
                "scse": lambda: ChannelSpatialSE(channels, reduction, aggregation),
            }[kind]()
            setattr(self, f"{block}_se", module)
            self.se_names.append(f"{block}_se")

        def _se(self, block, x):
            name = f"{block}_se"
            return getattr(self, name)(x) if name in self.se_names else x

        def forward(self, x):
            skips = []
            for level in range(1, DEPTH + 1):
                x = self._se(f"enc{level}", getattr(self, f"enc{level}")(x))
                skips.append(x)
                x = F.max_pool2d(x, 2)
            x = self._se("bottleneck", self.bottleneck(x))
            for level in range(DEPTH, 0, -1):
                x = self._se(f"dec{level}", getattr(self, f"dec{level}")(x, skips[level - 1]))
            return self.head(x).float()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def load_flax_variables(model, variables: dict[str, Any]) -> None:
    """Copies a Flax UNet's {"params", "batch_stats"} into the module of the same names.

    Flax kernels are HWIO (convolutions) or (in, out) (dense); PyTorch's are OIHW and (out, in).
    """
    import numpy as np

    renames = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    state = model.state_dict()

    def walk(tree, path):
        for key, value in tree.items():
            if isinstance(value, dict) or hasattr(value, "items"):
                walk(value, (*path, key))
                continue
            array = np.array(value, dtype=np.float32)
            if key == "kernel":
                array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
            name = ".".join((*path, renames.get(key, key)))
            if name not in state or tuple(state[name].shape) != array.shape:
                raise KeyError(f"{name} {array.shape}: no such parameter in the PyTorch UNet")
            state[name] = torch.from_numpy(np.ascontiguousarray(array))

    walk(variables["params"], ())
    walk(variables.get("batch_stats", {}), ())
    model.load_state_dict(state)


def segmentation_loss(logits, labels):
    """Cross entropy (class weights all one) plus 1 - mean foreground soft Dice over the batch."""
    logits = logits.float()
    cross_entropy = F.cross_entropy(logits, labels)
    probs = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * one_hot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    dice = (2 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
    return cross_entropy + (1 - dice[1:].mean())


class Reference:
    """One model, optimizer and pair of steps per mode ("eager", "compile") on one device.

    A mode whose first calls raise (a torch.compile backend that fails on this machine) is
    left out, its error kept in ``errors``, so that the other mode is still measured.

    Attributes:
      models: per working mode, the module its steps train.
      settings: what was built (batch, size, features, se, dtype, device, modes, ...).
      setup_s: per working mode, the first train and inference calls (compilation for "compile").
      errors: per failed mode, the error's last line (the traceback goes to stderr).
    """

    def __init__(self, *, batch: int, size: int, features: int, se: str, dtype: str, device: str,
                 modes=("eager",), compile_backend: str = "inductor", seed: int = 0):
        _require_torch()
        unknown = [mode for mode in modes if mode not in MODES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}: expected some of {MODES}")
        self.device = torch.device(device)
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(batch, 1, size, size, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (batch, size, size), generator=generator)
        self.images = images.to(self.device).contiguous(memory_format=self.memory_format)
        self.labels = labels.to(self.device)
        self.steps: dict[str, tuple[Any, Any]] = {}
        self.models: dict[str, Any] = {}
        self.setup_s: dict[str, dict[str, float]] = {}
        self.errors: dict[str, str] = {}
        params = None
        for mode in modes:
            torch.manual_seed(seed)
            model = UNet(features=features, se=se).to(self.device, memory_format=self.memory_format)
            params = count_params(model)
            optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=self.device.type == "cuda")
            steps = self._make_steps(model, optimizer, mode == "compile", compile_backend)
            try:
                setup = {"train_first_call_s": self._time(steps[0]), "infer_first_call_s": self._time(steps[1])}
            except Exception as error:  # noqa: BLE001 - any backend failure leaves the other mode measurable
                traceback.print_exc()
                self.errors[mode] = f"{type(error).__name__}: {error}".splitlines()[0]
                continue
            self.models[mode], self.steps[mode], self.setup_s[mode] = model, steps, setup
        self.settings = {
            "batch": batch, "size": size, "features": features, "se": se, "dtype": dtype,
            "precision": "autocast bfloat16, float32 parameters" if self.autocast_dtype else "float32",
            "device": str(self.device), "device_name": self._device_name(), "modes": list(modes),
            "compile_backend": compile_backend if "compile" in modes else None,
            "memory_format": "channels_last" if self.memory_format == torch.channels_last else "contiguous (NCHW)",
            "optimizer": "Adam (fused)" if self.device.type == "cuda" else "Adam (foreach)",
            "params": params, "torch": torch.__version__, "threads": torch.get_num_threads(),
        }

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _make_steps(self, model, optimizer, compiled: bool, backend: str):
        def forward_loss(images, labels):
            with self._autocast():
                logits = model(images)
            return segmentation_loss(logits, labels)

        def predict(images):
            with self._autocast():
                return model(images).argmax(dim=1)

        if compiled:
            forward_loss = torch.compile(forward_loss, backend=backend)
            predict = torch.compile(predict, backend=backend)

        def train_step():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = forward_loss(self.images, self.labels)
            loss.backward()
            optimizer.step()
            return loss

        def infer_step():
            model.eval()
            with torch.inference_mode():
                return predict(self.images)

        return train_step, infer_step

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time(self, step) -> float:
        self._sync()
        start = time.perf_counter()
        step()
        self._sync()
        return time.perf_counter() - start

    def measure(self, mode: str, what: str, steps: int) -> dict[str, Any]:
        """Median seconds of `steps` calls of the mode's "train" or "infer" step."""
        step = self.steps[mode][0 if what == "train" else 1]
        times = [self._time(step) for _ in range(steps)]
        return {"median_s": statistics.median(times), "times_s": times}


def serve(reference: Reference, requests, replies) -> None:
    """Answers {"mode", "what", "steps"} lines with measure()'s JSON, until end of input."""
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        reply = reference.measure(request["mode"], request["what"], int(request["steps"]))
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--se", default="scse", choices=("none", "cse", "sse", "scse"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cuda" if torch is not None and torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="eager", help="comma-separated: eager, compile")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager': tracing only)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per figure (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--serve", action="store_true", help="answer bench.py's JSON-line requests on stdin")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch is None:
        print(json.dumps({"error": f"PyTorch is not installed for {sys.executable}"}), flush=True)
        return 3
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = tuple(mode for mode in args.modes.split(",") if mode)
    reference = Reference(
        batch=args.batch, size=args.size, features=args.features, se=args.se, dtype=args.dtype,
        device=args.device, modes=modes, compile_backend=args.compile_backend,
    )
    ready = {"settings": reference.settings, "setup_s": reference.setup_s, "errors": reference.errors}
    if args.serve:
        print(json.dumps(ready), flush=True)
        serve(reference, sys.stdin, sys.stdout)
        return 0
    for mode in reference.steps:
        for what in ("train", "infer"):
            seconds = reference.measure(mode, what, args.steps)["median_s"]
            ready[f"{mode}_{what}_images_per_s"] = args.batch / seconds
    print(json.dumps(ready, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
