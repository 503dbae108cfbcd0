"""Speed of scse_jax against the machine's own limit: train step, inference, input, scoring.

    python benchmarks/bench.py --batch 20 --size 256 --features 16 --se scse --json OUT.json
    python benchmarks/bench.py --quick --size 32 --batch 8 --features 4 --json quick.json
    python benchmarks/bench.py --scaling --json docs/benchmarks/cpu-2core.json \\
        --plot docs/benchmarks/cpu-2core.png
    python benchmarks/bench.py --device --dtype bfloat16 --json docs/benchmarks/h100.json
    python benchmarks/bench.py --compare-torch --json OUT.json   # PyTorch reference in turns

Every figure comes from the real code path: ``state.build_model``, ``state.make_optimizer``,
``state.create_train_state``, ``train.jit_train_step`` (explicit shardings, donated state),
``prediction.predict_step`` and ``inference.Segmenter``. FLOPs per image come from XLA's cost
analysis of the compiled programs; the peak they are divided by is a dense matmul measured in
the same run (CPU) or the chip's datasheet peak (``--device``). ``--scaling`` repeats the model
figures at several sizes and batches, each in a fresh process (own compile, own peak RSS).
``--compare-torch`` times the same network in PyTorch (``torch_reference.py``, a child process
per mode kept alive between turns) alternately with the project's train and inference steps,
and records both and their ratios; without PyTorch it says so and reports the project alone.

On Linux the benchmark restarts itself once with malloc huge pages, as launch.py and the
experiment runner do (``scse_jax/hugepages.py``); ``--plain-malloc`` keeps the plain allocator.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TORCH_REFERENCE = Path(__file__).resolve().with_name("torch_reference.py")
# With --device --compare-torch, JAX's share of the accelerator's memory (its default, 75%,
# would leave PyTorch's process beside it too little); XLA_PYTHON_CLIENT_MEM_FRACTION overrides.
SHARED_DEVICE_MEMORY_FRACTION = "0.45"

# Dense peak TFLOP/s (no sparsity) by device kind substring, first match wins. Sources: NVIDIA
# H100 Tensor Core GPU datasheet (SXM: 989 bf16, 67 fp32; PCIe: 756 bf16, 51 fp32), NVIDIA
# H200 datasheet (same compute as H100 SXM), NVIDIA A100 datasheet (312 bf16, 19.5 fp32).
DEVICE_PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 51.0}),
    ("H100", {"bfloat16": 989.0, "float32": 67.0}),
    ("H200", {"bfloat16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float32": 19.5}),
)

SCALING_SIZES = (128, 256, 512)
CHAOS_CT_SAMPLE = Path(
    os.environ.get("SCSE_CHAOS_CT_SAMPLE", PROJECT_ROOT / "../shared/data/chaos_ct_sample")
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=20, help="global training batch (the paper's 20)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels, a multiple of 16")
    parser.add_argument("--features", type=int, default=16, help="width of the first U-Net block")
    parser.add_argument("--se", default="scse", choices=("none", "cse", "sse", "scse"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed train steps after compiling")
    parser.add_argument("--volume-slices", type=int, default=78, help="slices of the whole-volume inference")
    parser.add_argument("--input-batches", type=int, default=6, help="batches of the input-pipeline epoch")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="scaling plot (PNG); with --scaling")
    parser.add_argument("--quick", action="store_true", help="few repeats, small scoring volume: seconds")
    parser.add_argument("--scaling", action="store_true", help="also sweep --sizes x --batches")
    parser.add_argument("--sizes", default=None, help="scaling sizes, e.g. 128,256,512 (the default)")
    parser.add_argument("--batches", default=None, help="scaling batches (default: batch/2 and batch)")
    parser.add_argument("--model-only", action="store_true", help="train and inference figures only")
    parser.add_argument("--device", action="store_true", help="run on the accelerator, against its peak")
    parser.add_argument("--plain-malloc", action="store_true", help="do not enable malloc huge pages")
    parser.add_argument(
        "--cpu-devices", default="auto",
        help="JAX devices the CPU is split into, the batch sharded over them: auto (one per physical core, "
        "as many as divide --batch) or a count (launch.py --cpu_devices)",
    )
    parser.add_argument(
        "--xla-kernel-gradient", action="store_true",
        help="XLA's convolution kernel gradient (model.fast_kernel_gradient=False): slower, less memory",
    )
    torch_options = parser.add_argument_group("PyTorch reference (--compare-torch)")
    torch_options.add_argument(
        "--compare-torch", action="store_true",
        help="time benchmarks/torch_reference.py's steps in turns with the project's (needs torch)",
    )
    torch_options.add_argument(
        "--torch-modes", default=None,
        help="comma-separated eager,compile (default: eager on the CPU, eager,compile with --device)",
    )
    torch_options.add_argument("--torch-rounds", type=int, default=2, help="alternations (medians reported)")
    torch_options.add_argument(
        "--torch-compile-backend", default="inductor", help="torch.compile backend ('eager': tracing only)"
    )
    torch_options.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads in the reference (0: PyTorch's default)"
    )
    torch_options.add_argument(
        "--torch-python", default=sys.executable, help="the interpreter that has torch (default: this one)"
    )
    torch_options.add_argument(
        "--torch-timeout", type=float, default=900.0,
        help="seconds one answer of the reference may take, its set-up and compilation included",
    )
    args = parser.parse_args(argv)
    if args.size < 16 or args.size % 16:
        parser.error(f"--size {args.size} must be a positive multiple of 16")
    if args.torch_modes is None:
        args.torch_modes = "eager,compile" if args.device else "eager"
    modes = [mode for mode in args.torch_modes.split(",") if mode]
    if not modes or any(mode not in ("eager", "compile") for mode in modes):
        parser.error(f"--torch-modes {args.torch_modes!r}: expected some of eager,compile")
    if args.torch_rounds < 1:
        parser.error("--torch-rounds must be at least 1")
    if args.quick:
        args.steps = min(args.steps, 2)
        args.volume_slices = min(args.volume_slices, 2 * args.batch)
        args.input_batches = min(args.input_batches, 3)
    return args


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (fn blocks until its result is ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """The process's peak resident set so far, in MiB (VmHWM: ru_maxrss survives exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def flops_of(compiled, num_devices: int) -> float:
    """FLOPs of one call of a compiled program over `num_devices`, from XLA's cost analysis
    (which counts one device's share of a partitioned program)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", math.nan)) * num_devices


def machine_description(jax) -> dict[str, Any]:
    device = jax.devices()[0]
    cpu_model = ""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_model": cpu_model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "prng_impl": str(jax.config.jax_default_prng_impl),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def device_peak_gflops(device_kind: str, dtype: str) -> float | None:
    for name, peaks in DEVICE_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks[dtype] * 1000.0
    return None


def measure_gemm_gflops(jax, jnp, *, dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """Dense n x n matmul GFLOP/s, the median of ``repeats`` timed calls."""
    import numpy as np

    # Operands from NumPy: jax.random takes seconds per draw under jax_disable_most_optimizations.
    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    a, b = jnp.asarray(a, jnp.dtype(dtype)), jnp.asarray(b, jnp.dtype(dtype))
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
    return 2 * n**3 / seconds / 1e9


def bench_config(args: argparse.Namespace):
    from configs import default

    config = default.get_config()
    config.model.features = args.features
    config.model.se = args.se
    config.model.compute_dtype = args.dtype
    config.model.fast_kernel_gradient = not args.xla_kernel_gradient
    config.data.image_size = args.size
    config.train.batch_size = args.batch
    config.eval.batch_size = args.batch
    return config


def random_batch(batch: int, size: int, num_classes: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(batch, size, size, 1)).astype(np.float32),
        "label": rng.integers(0, num_classes, (batch, size, size)).astype(np.int32),
    }


def bench_model(args: argparse.Namespace, peak_gflops: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train-step and inference figures; returns them and the objects the input bench reuses."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from scse_jax import prediction, sharding, train
    from scse_jax.state import build_model, create_train_state, make_optimizer
    from scse_jax.data.types import CLASS_NAMES

    config = bench_config(args)
    num_classes = len(CLASS_NAMES)
    mesh = sharding.make_data_mesh()
    sharding.check_batch_size(args.batch, mesh)
    model = build_model(config.model, num_classes)
    tx = make_optimizer(config.train, steps_per_epoch=1000)

    start = time.perf_counter()
    state, _ = create_train_state(model, tx, image_size=args.size, seed=0, mesh=mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start

    host_batch = random_batch(args.batch, args.size, num_classes)
    batch = sharding.shard_batch(host_batch, mesh)
    class_weights = jax.device_put(jnp.ones(num_classes, jnp.float32), sharding.replicated_sharding(mesh))
    train_fn = train.jit_train_step(model, tx, config.train, mesh)
    start = time.perf_counter()
    train_compiled = train_fn.lower(state, batch, class_weights).compile()
    compile_s = time.perf_counter() - start
    train_flops = flops_of(train_compiled, mesh.devices.size)
    train_memory = train_compiled.memory_analysis()

    for _ in range(args.warmup):
        state, _ = train_compiled(state, batch, class_weights)
    jax.block_until_ready(state)
    step_times = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        state, parts = train_compiled(state, batch, class_weights)
        jax.block_until_ready((state, parts))
        step_times.append(time.perf_counter() - begin)
    step_s = statistics.median(step_times)
    loss = float(parts["loss"])

    variables = state.variables()
    replicated = sharding.replicated_sharding(mesh)
    predict = jax.jit(
        functools.partial(prediction.predict_step, model=model, probabilities=False),
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh),
    )
    start = time.perf_counter()
    predict_compiled = predict.lower(variables, batch["image"]).compile()
    infer_compile_s = time.perf_counter() - start
    infer_flops = flops_of(predict_compiled, mesh.devices.size)
    predict_compiled(variables, batch["image"]).block_until_ready()
    infer_s = median_seconds(
        lambda: predict_compiled(variables, batch["image"]).block_until_ready(), max(args.steps, 3)
    )

    volume = bench_volume_inference(args, config, variables, num_classes)

    train_gflop = train_flops / args.batch / 1e9
    infer_gflop = infer_flops / args.batch / 1e9
    result = {
        "init_s": init_s,
        "compile_s": compile_s,
        "train_step_s": step_s,
        "train_step_times_s": step_times,
        "train_images_per_s": args.batch / step_s,
        "train_loss_last": loss,
        "train_gflop_per_image": train_gflop,
        "train_gflops_achieved": train_gflop * args.batch / step_s,
        "train_fraction_of_peak": train_gflop * args.batch / step_s / peak_gflops,
        "train_temp_memory_mb": train_memory.temp_size_in_bytes * mesh.devices.size / 2**20 if train_memory else None,
        "infer_compile_s": infer_compile_s,
        "infer_batch_s": infer_s,
        "infer_images_per_s": args.batch / infer_s,
        "infer_gflop_per_image": infer_gflop,
        "infer_gflops_achieved": infer_gflop * args.batch / infer_s,
        "infer_fraction_of_peak": infer_gflop * args.batch / infer_s / peak_gflops,
        **volume,
    }
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        result["device_peak_memory_mb"] = stats["peak_bytes_in_use"] / 2**20
    reuse = {"state": state, "train_compiled": train_compiled, "class_weights": class_weights, "mesh": mesh,
             "step_s": step_s, "num_classes": num_classes, "batch": batch, "predict_compiled": predict_compiled}
    return result, reuse


def bench_volume_inference(args, config, variables, num_classes: int) -> dict[str, Any]:
    """Whole-volume inference through Segmenter: one compiled function for any volume length."""
    import numpy as np

    from scse_jax.data.types import CLASS_NAMES
    from scse_jax.inference import Segmenter

    segmenter = Segmenter(config, variables, CLASS_NAMES[:num_classes], batch_size=args.batch)
    slices = np.random.default_rng(1).normal(size=(args.volume_slices, args.size, args.size)).astype(np.float32)
    start = time.perf_counter()
    segmenter.segment(slices[: args.batch])
    first_call_s = time.perf_counter() - start
    seconds = median_seconds(lambda: segmenter.segment(slices), 1 if args.quick else 2)
    segmenter.segment(slices[: max(1, args.volume_slices // 3)])  # another length: no new compile
    return {
        "volume_slices": args.volume_slices,
        "volume_infer_s": seconds,
        "volume_slices_per_s": args.volume_slices / seconds,
        "volume_first_call_s": first_call_s,
        "volume_compiles": segmenter.traces,
    }


def bench_input(args: argparse.Namespace, reuse: dict[str, Any]) -> dict[str, Any]:
    """Preprocessed-cache batches per second, and how long training waits for them."""
    import jax
    import numpy as np

    from scse_jax import sharding
    from scse_jax.data import pipeline

    count = args.batch * args.input_batches
    host = random_batch(count, args.size, reuse["num_classes"], seed=2)
    dataset = pipeline.SliceDataset(images=host["image"], labels=host["label"])
    augment = functools.partial(pipeline.augment_batch, modality="MR")

    def epoch(augmented: bool):
        return pipeline.iterate_batches(
            dataset, batch_size=args.batch, epoch=0, seed=0, augment=augment if augmented else None
        )

    def batches_per_s(augmented: bool) -> float:
        start = time.perf_counter()
        produced = sum(1 for _ in epoch(augmented))
        return produced / (time.perf_counter() - start)

    plain = batches_per_s(False)
    augmented = batches_per_s(True)

    # One augmented epoch fed through the prefetching device iterator into the real train step.
    state, train_compiled, weights = reuse["state"], reuse["train_compiled"], reuse["class_weights"]
    iterator = sharding.device_batches(epoch(True), reuse["mesh"], prefetch_size=2)
    waits = []
    start = time.perf_counter()
    while True:
        asked = time.perf_counter()
        batch = next(iterator, None)
        waits.append(time.perf_counter() - asked)
        if batch is None:
            break
        state, parts = train_compiled(state, batch, weights)
    jax.block_until_ready(state)
    epoch_s = time.perf_counter() - start
    steps = len(waits) - 1
    compute_s = steps * reuse["step_s"]
    reuse["state"] = state
    return {
        "input_batches_per_s": plain,
        "input_augmented_batches_per_s": augmented,
        "input_images_per_s": plain * args.batch,
        "input_augmented_images_per_s": augmented * args.batch,
        "input_epoch_steps": steps,
        "input_epoch_s": epoch_s,
        "input_wait_fraction": sum(waits) / epoch_s,
        "input_wait_fraction_after_first_batch": sum(waits[1:]) / epoch_s,
        # Waiting hides host work that slows the steps instead (2 cores shared by both).
        "input_overhead_fraction": max(0.0, 1.0 - compute_s / epoch_s),
    }


class TorchReferenceError(RuntimeError):
    """The PyTorch reference is missing, failed or did not answer in time."""


class TorchReference:
    """benchmarks/torch_reference.py --serve in a child process: one JSON line per request.

    The child's stderr is this process's; its answers are read by a thread, so that a child
    that hangs (a compilation that never ends) costs `timeout` seconds, not the benchmark.
    """

    def __init__(self, command: list[str], timeout: float):
        self.timeout = timeout
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self._answer()
        if self.ready["errors"]:
            self.close()
            raise TorchReferenceError("; ".join(self.ready["errors"].values()))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _answer(self) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            self.close(kill=True)
            raise TorchReferenceError(f"no answer within {self.timeout:.0f} s (--torch-timeout)") from None
        if line is None:
            code = self.process.wait()
            raise TorchReferenceError(f"the reference process ended (exit status {code}); its stderr is above")
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise TorchReferenceError(answer["error"])
        return answer

    def median_s(self, mode: str, what: str, steps: int) -> float:
        try:
            self.process.stdin.write(json.dumps({"mode": mode, "what": what, "steps": steps}) + "\n")
            self.process.stdin.flush()
        except OSError as error:  # the child is gone
            raise TorchReferenceError(f"the reference process is gone ({error})") from None
        return self._answer()["median_s"]

    def close(self, *, kill: bool = False) -> None:
        """Ends the child: end of input (it exits by itself), or SIGKILL when `kill` or 30 s later."""
        if self.process.poll() is None:
            if not kill:
                try:
                    self.process.stdin.close()
                    self.process.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def compare_torch(args: argparse.Namespace, reuse: dict[str, Any]) -> dict[str, Any]:
    """The PyTorch reference's train and inference steps timed in turns with the project's.

    Each mode (eager, compile) runs in a child process of its own, so that a compilation that
    fails or outlasts ``--torch-timeout`` costs that mode alone. Each round times ``--steps``
    project train steps, then each mode's, then the same for inference (medians);
    ``project_*_speedup`` is the median over rounds of PyTorch's seconds over the project's
    (above 1: the project is faster). Without PyTorch the result says why and holds no figures.
    """
    import jax

    modes = [mode for mode in args.torch_modes.split(",") if mode]
    command = [
        args.torch_python, str(TORCH_REFERENCE), "--serve", "--batch", str(args.batch), "--size", str(args.size),
        "--features", str(args.features), "--se", args.se, "--dtype", args.dtype,
        "--device", "cuda" if args.device else "cpu", "--compile-backend", args.torch_compile_backend,
        "--threads", str(args.torch_threads), "--modes",
    ]
    result: dict[str, Any] = {"commands": {mode: " ".join(command + [mode]) for mode in modes}, "rounds": [],
                              "setup_s": {}}
    references: dict[str, TorchReference] = {}
    errors: dict[str, str] = {}
    for mode in modes:
        start = time.perf_counter()
        try:
            references[mode] = TorchReference(command + [mode], args.torch_timeout)
        except (TorchReferenceError, OSError) as error:
            errors[mode] = str(error)
            print(f"PyTorch reference, {mode}: {error}", file=sys.stderr, flush=True)
            continue
        result["settings"] = {**references[mode].ready["settings"], "modes": modes}
        result["setup_s"][mode] = {**references[mode].ready["setup_s"][mode],
                                   "process_start_s": time.perf_counter() - start}
    if not references:
        message = f"PyTorch reference not measured: {'; '.join(sorted(set(errors.values())))}; the project's figures alone"
        print(message, file=sys.stderr, flush=True)
        return {**result, "status": "skipped", "message": message, "mode_errors": errors}

    train_compiled, weights, batch = reuse["train_compiled"], reuse["class_weights"], reuse["batch"]
    predict_compiled = reuse["predict_compiled"]

    def project_train_step() -> None:
        reuse["state"], parts = train_compiled(reuse["state"], batch, weights)
        jax.block_until_ready((reuse["state"], parts))

    def ask(row: dict[str, float], what: str, key: str, steps: int) -> None:
        for mode, reference in list(references.items()):
            try:
                row[f"{mode}_{key}"] = reference.median_s(mode, what, steps)
            except TorchReferenceError as error:
                errors[mode] = f"round {len(result['rounds']) + 1}: {error}"
                print(f"PyTorch reference, {mode}: {errors[mode]}", file=sys.stderr, flush=True)
                references.pop(mode).close()

    try:
        for _ in range(args.torch_rounds):
            row = {"project_train_step_s": median_seconds(project_train_step, args.steps)}
            ask(row, "train", "train_step_s", args.steps)
            variables = reuse["state"].variables()
            row["project_infer_batch_s"] = median_seconds(
                lambda: predict_compiled(variables, batch["image"]).block_until_ready(), max(args.steps, 3)
            )
            ask(row, "infer", "infer_batch_s", max(args.steps, 3))
            result["rounds"].append(row)
    finally:
        for reference in references.values():
            reference.close()
    if errors:
        result["mode_errors"] = errors

    def median_over_rounds(fn, key: str) -> float | None:
        values = [fn(row) for row in result["rounds"] if key in row]
        return statistics.median(values) if values else None

    result["project"] = {
        "train_images_per_s": median_over_rounds(lambda row: args.batch / row["project_train_step_s"], "project_train_step_s"),
        "infer_images_per_s": median_over_rounds(lambda row: args.batch / row["project_infer_batch_s"], "project_infer_batch_s"),
    }
    result["modes"] = {}
    for mode in modes:
        train_key, infer_key = f"{mode}_train_step_s", f"{mode}_infer_batch_s"
        if not any(train_key in row and infer_key in row for row in result["rounds"]):
            continue
        result["modes"][mode] = {
            "rounds": sum(train_key in row and infer_key in row for row in result["rounds"]),
            "train_images_per_s": median_over_rounds(lambda row: args.batch / row[train_key], train_key),
            "infer_images_per_s": median_over_rounds(lambda row: args.batch / row[infer_key], infer_key),
            "project_train_speedup": median_over_rounds(
                lambda row: row[train_key] / row["project_train_step_s"], train_key),
            "project_infer_speedup": median_over_rounds(
                lambda row: row[infer_key] / row["project_infer_batch_s"], infer_key),
        }
    result["status"] = "measured" if result["modes"] else "failed"
    if not result["modes"]:
        result["message"] = f"PyTorch reference failed: {errors}; the project's figures alone"
    return result


def synthetic_volume_masks(shape=(78, 512, 512), seed: int = 0):
    """A liver-sized ellipsoid and a perturbed prediction of it, (slices, rows, cols) uint8."""
    import numpy as np
    from scipy import ndimage

    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    centre = np.array(shape) / 2
    radii = np.array([shape[0] * 0.35, shape[1] * 0.22, shape[2] * 0.28])
    inside = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    truth = (inside <= 1.0).astype(np.uint8)
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 3)
    prediction = (inside + 0.8 * noise <= 1.05).astype(np.uint8)
    return prediction, truth


def bench_scoring(args: argparse.Namespace) -> dict[str, Any]:
    """CHAOS metrics (Dice ... MSSD) of a 512 x 512 x 78 volume: synthetic and, if present, real."""
    from scse_jax import metrics

    shape = (24, 128, 128) if args.quick else (78, 512, 512)
    prediction, truth = synthetic_volume_masks(shape)
    spacing = (2.0, 0.7265625, 0.7265625)
    start = time.perf_counter()
    scores = metrics.score_volume(prediction, truth, spacing, class_ids=(1,))
    result = {
        "scoring_volume_shape": list(shape),
        "scoring_s": time.perf_counter() - start,
        "scoring_synthetic_dice": scores[1]["dice"],
    }
    if not args.quick and (CHAOS_CT_SAMPLE / "DICOM_anon").is_dir():
        from scse_jax import evaluate

        start = time.perf_counter()
        _, organ_scores = evaluate.evaluate_png_series(
            CHAOS_CT_SAMPLE / "Ground", CHAOS_CT_SAMPLE / "Segmentation", CHAOS_CT_SAMPLE / "DICOM_anon"
        )
        result["scoring_real_ct_s"] = time.perf_counter() - start
        result["scoring_real_ct_note"] = "evaluate_png_series: reads 78 DICOMs and 2 x 78 PNGs, then scores"
        result["scoring_real_ct_liver"] = organ_scores["liver"]
    return result


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of one configuration, in this process."""
    if not args.device:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    layout = None
    if not args.device:
        from scse_jax import cpu_layout

        layout = cpu_layout.set_up(args.cpu_devices, [args.batch])

    if args.device and jax.default_backend() == "cpu":
        raise SystemExit("--device: no accelerator found (jax.default_backend() is 'cpu')")

    machine = machine_description(jax)
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {
            "batch": args.batch, "size": args.size, "features": args.features, "se": args.se,
            "dtype": args.dtype, "kernel_gradient": "xla" if args.xla_kernel_gradient else "fast",
            "steps": args.steps, "warmup": args.warmup, "quick": args.quick, "cpu_devices": args.cpu_devices,
            "cpu_layout": layout.describe() if layout else None,
        },
        "machine": machine,
    }
    gemm_dtype = args.dtype if args.device else "float32"
    results["gemm_gflops"] = measure_gemm_gflops(jax, jnp, dtype=gemm_dtype, repeats=3 if args.quick else 10)
    peak = results["gemm_gflops"]
    results["peak_source"] = f"measured {gemm_dtype} 2048x2048 matmul, median"
    if args.device:
        datasheet = device_peak_gflops(machine["device_kind"], args.dtype)
        if datasheet:
            peak = datasheet
            results["peak_source"] = f"datasheet dense {args.dtype} peak of {machine['device_kind']}"
    results["peak_gflops"] = peak

    model, reuse = bench_model(args, peak)
    results.update(model)
    if args.compare_torch:
        results["torch_reference"] = compare_torch(args, reuse)
    if not args.model_only:
        results.update(bench_input(args, reuse))
        results.update(bench_scoring(args))
    results["gemm_gflops_end"] = measure_gemm_gflops(jax, jnp, dtype=gemm_dtype, repeats=3 if args.quick else 5)
    results["peak_rss_mb"] = peak_rss_mb()
    results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def scaling_points(args: argparse.Namespace) -> list[tuple[int, int]]:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SCALING_SIZES)
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    else:
        batches = sorted({max(1, args.batch // 2), args.batch})
    return [(size, batch) for size in sizes for batch in batches]


def run_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The model figures at every (size, batch), each in its own process."""
    rows = []
    for size, batch in scaling_points(args):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "point.json"
            command = [
                sys.executable, str(Path(__file__).resolve()), "--model-only",
                "--size", str(size), "--batch", str(batch), "--features", str(args.features),
                "--se", args.se, "--dtype", args.dtype, "--steps", str(min(args.steps, 3)),
                "--warmup", str(args.warmup), "--volume-slices", str(batch), "--json", str(out),
            ]
            command += ["--quick"] * args.quick + ["--device"] * args.device + ["--plain-malloc"] * args.plain_malloc
            command += ["--xla-kernel-gradient"] * args.xla_kernel_gradient
            command += ["--cpu-devices", str(args.cpu_devices)]
            print(f"scaling: size {size} batch {batch}", file=sys.stderr, flush=True)
            completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
            if completed.returncode:
                last_line = completed.stderr.strip().splitlines()[-1:]
                rows.append({"size": size, "batch": batch, "returncode": completed.returncode, "error": last_line})
                continue
            point = json.loads(out.read_text())
        keys = (
            "train_images_per_s", "infer_images_per_s", "compile_s", "peak_rss_mb", "train_gflop_per_image",
            "infer_gflop_per_image", "gemm_gflops", "train_fraction_of_peak", "infer_fraction_of_peak",
            "train_temp_memory_mb",
        )
        rows.append({"size": size, "batch": batch, **{key: point.get(key) for key in keys}})
    return rows


def plot_scaling(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and inference images per second against image size, one line per batch."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.subplots()
    for batch in sorted({row["batch"] for row in rows}):
        points = sorted((r["size"], r) for r in rows if r["batch"] == batch and "error" not in r)
        if not points:
            continue
        sizes = [size for size, _ in points]
        axes.plot(sizes, [r["train_images_per_s"] for _, r in points], "o-", label=f"train, batch {batch}")
        axes.plot(sizes, [r["infer_images_per_s"] for _, r in points], "s--", label=f"inference, batch {batch}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(sorted({row["size"] for row in rows}), [str(s) for s in sorted({row["size"] for row in rows})])
    axes.set_xlabel("image side (pixels)")
    axes.set_ylabel("images per second")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    from scse_jax import plots

    plots.save_figure(figure, path, dpi=120)


def plot_title(results: dict[str, Any]) -> str:
    settings, machine = results["settings"], results["machine"]
    where = machine["cpu_model"] if machine["platform"] == "cpu" else machine["device_kind"]
    if machine["platform"] == "cpu" and machine["device_count"] > 1:
        where += f", {machine['device_count']} JAX devices"
    return f"scse_jax U-Net ({settings['se']}, features {settings['features']}, {settings['dtype']}) on {where}"


def write_json(results: dict[str, Any], path: Path) -> None:
    from scse_jax import files

    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, json.dumps(results, indent=2, sort_keys=False, default=float) + "\n")


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = [
        *filter(None, [results["settings"].get("cpu_layout")]),
        f"matmul peak {results['gemm_gflops']:.1f} GFLOP/s ({results['peak_source']})",
        f"train {results['train_images_per_s']:.2f} img/s, {results['train_gflop_per_image']:.2f} GFLOP/img, "
        f"{100 * results['train_fraction_of_peak']:.1f}% of peak; compile {results['compile_s']:.1f} s",
        f"infer {results['infer_images_per_s']:.2f} img/s, {results['infer_gflop_per_image']:.2f} GFLOP/img, "
        f"{100 * results['infer_fraction_of_peak']:.1f}% of peak; volume of {results['volume_slices']} slices "
        f"{results['volume_infer_s']:.2f} s",
    ]
    if "input_batches_per_s" in results:
        lines.append(
            f"input {results['input_batches_per_s']:.1f} batches/s plain, {results['input_augmented_batches_per_s']:.2f} "
            f"augmented; waiting {100 * results['input_wait_fraction']:.1f}% of an epoch "
            f"({100 * results['input_wait_fraction_after_first_batch']:.1f}% after its first batch)"
        )
        lines.append(f"scoring {results['scoring_s']:.2f} s for {results['scoring_volume_shape']}")
    torch_result = results.get("torch_reference") or {}
    for mode, figures in torch_result.get("modes", {}).items():
        lines.append(
            f"PyTorch {mode}: train {figures['train_images_per_s']:.2f} img/s (project "
            f"{figures['project_train_speedup']:.2f}x), infer {figures['infer_images_per_s']:.2f} img/s "
            f"(project {figures['project_infer_speedup']:.2f}x); median of {figures['rounds']} rounds"
        )
    if "message" in torch_result:
        lines.append(torch_result["message"])
    for mode, error in torch_result.get("mode_errors", {}).items() if torch_result.get("modes") else ():
        lines.append(f"PyTorch {mode} not measured: {error}")
    lines.append(f"peak RSS {results['peak_rss_mb']:.0f} MiB")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(PROJECT_ROOT))
    from scse_jax import hugepages

    if not (args.plain_malloc or args.device):
        hugepages.restart_with_hugepages("bench.py")
    if args.device and args.compare_torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", SHARED_DEVICE_MEMORY_FRACTION)
    import jax

    # The threefry draws of a jitted init compile for tens of seconds on a small CPU; the
    # "rbg" generator gives the same shapes and distributions in a fraction of that.
    jax.config.update("jax_default_prng_impl", "rbg")
    results = run_one(args)
    if args.scaling:
        results["scaling"] = run_scaling(args)
        if args.plot:
            title = plot_title(results)
            plot_scaling(results["scaling"], args.plot, title)
    if args.json:
        write_json(results, args.json)
    print("\n".join(summary_lines(results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
