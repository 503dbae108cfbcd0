"""benchmarks/gpu_study.sh: the whole GPU study, tiny, on the CPU; and the PyTorch reference network."""

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_study.sh"
WHEELS = PROJECT_ROOT / "../shared/wheels/gpu-py312"
OUTPUTS = {
    "gpu_study.json", "gpu_study.log", "bench_float32.json", "bench_bfloat16.json", "speed.png",
    "study_results.md", "study_results.csv", "study_loss_curves.png",
}
HAS_TORCH = importlib.util.find_spec("torch") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_module(name):
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_study():
    return load_module("gpu_study")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(OUT folder, seconds, completed process) of one dry run, with the shared wheels where present."""
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHON"] = sys.executable
    env["TMPDIR"] = str(work)
    env["JAX_NUM_CPU_DEVICES"] = "1"  # the lent machine has one GPU; the CPU's auto layout would compile for two
    command = ["bash", str(SCRIPT), str(out), "--dry-run", "--work", str(work)]
    if any(WHEELS.glob("*.whl")):
        command += ["--wheels", str(WHEELS)]
    start = time.monotonic()
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    return out, time.monotonic() - start, completed


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_dry_run_writes_every_output_the_gpu_machine_sends_back(dry_run):
    out, seconds, completed = dry_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    print(f"dry run: {seconds:.0f} s")
    # What comes back from the lent machine: at most 8 files, top level, plain names.
    files = {path.name for path in out.iterdir()}
    assert files == OUTPUTS
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) and (out / name).is_file() for name in files)
    for name in ("speed.png", "study_loss_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    if any(WHEELS.glob("*.whl")):
        assert "installing 4 wheels" in completed.stdout

    summary = json.loads((out / "gpu_study.json").read_text())
    assert summary["dry_run"] is True
    assert {name: part["status"] for name, part in summary["parts"].items()} == {
        "bench_float32": "ok", "bench_bfloat16": "ok", "study": "stopped: dry run, first fold done",
        "study_report": "ok",
    }
    assert set(summary["outputs"]) == OUTPUTS


def test_dry_run_benchmarks_both_dtypes_beside_pytorch(dry_run):
    out, _, completed = dry_run
    summary = json.loads((out / "gpu_study.json").read_text())
    names = [row["name"] for row in summary["speed"]]
    expected = ["scse_jax float32", "scse_jax bfloat16"]
    if HAS_TORCH:
        expected += [f"PyTorch {mode} {dtype}" for dtype in ("float32", "bfloat16") for mode in ("eager", "compile")]
    assert sorted(names) == sorted(expected)
    for row in summary["speed"]:
        assert positive(row["train_images_per_s"]) and positive(row["infer_images_per_s"]), row
    for dtype in ("float32", "bfloat16"):
        bench = json.loads((out / f"bench_{dtype}.json").read_text())
        assert bench["settings"]["dtype"] == dtype
        for key in ("train_images_per_s", "infer_images_per_s", "train_fraction_of_peak", "compile_s"):
            assert positive(bench[key]), (dtype, key)
        assert 0 <= bench["input_wait_fraction"] <= 1
        reference = bench["torch_reference"]
        if HAS_TORCH:
            assert reference["status"] == "measured"
            assert len(reference["rounds"]) == 2
            for mode in ("eager", "compile"):
                figures = reference["modes"][mode]
                assert positive(figures["project_train_speedup"]) and positive(figures["project_infer_speedup"])
            assert reference["settings"]["precision"] == ("float32" if dtype == "float32" else
                                                          "autocast bfloat16, float32 parameters")
        else:
            assert reference["status"] == "skipped" and "PyTorch is not installed" in reference["message"]
            assert "PyTorch reference not measured" in completed.stdout


def test_dry_run_trains_the_mr_study_and_reports_it_when_stopped(dry_run):
    """Stopped as a spent budget stops it, after the first fold: a partial report of that fold."""
    out, _, _ = dry_run
    study = json.loads((out / "gpu_study.json").read_text())["study"]
    assert study["runs_planned"] == 6
    assert study["runs_finished"] == ["mr_scse_bf16/seed0/fold0", "mr_scse_cpu/seed0/fold0", "mr_unet_cpu/seed0/fold0"]
    assert study["folds_finished_by_all"] == ["seed0/fold0"]
    for name in ("mr_unet_cpu", "mr_scse_cpu", "mr_scse_bf16"):
        dice = study["mean_dice_largest_component"][name]
        assert 0 <= dice["all_finished_folds"] <= 1 and dice["all_finished_folds"] == dice["folds_finished_by_all"]
        assert dice["patients"] == 2  # fold 0 of the four phantom patients
    report = (out / "study_results.md").read_text()
    assert "(partial)" in report and "3 of 6 runs not finished" in report
    assert "Paired comparison, mr_scse_cpu minus mr_unet_cpu" in report
    assert "Paired comparison, mr_scse_bf16 minus mr_scse_cpu" in report  # does bfloat16 keep Dice
    with (out / "study_results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert {row["model"] for row in rows} == {"mr_unet_cpu", "mr_scse_cpu", "mr_scse_bf16"}
    assert {row["fold"] for row in rows} == {"0"}


def test_a_part_past_its_time_limit_is_stopped_then_killed(gpu_study, tmp_path):
    log = gpu_study.Log(tmp_path / "log")
    env = dict(os.environ)
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    outcome = gpu_study.run_part("sleeper", sleeper, timeout=2, log=log, env=env, grace=10)
    assert outcome["status"] == "stopped at its time limit" and outcome["seconds"] < 10
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('started', flush=True); time.sleep(60)"]
    outcome = gpu_study.run_part("stubborn", stubborn, timeout=2, log=log, env=env, grace=1)
    assert outcome["status"] == "killed"
    text = (tmp_path / "log").read_text()
    assert "[sleeper] started" in text and "SIGTERM" in text and "SIGKILL" in text


def test_study_summary_pairs_only_the_folds_every_config_finished(gpu_study, tmp_path):
    """A study cut by its budget: U-Net finished folds 0 and 1, scSE and its bfloat16 twin only fold 0."""
    rows = []
    for name, folds, dice in (("mr_unet_cpu", (0, 1), (0.8, 0.6)), ("mr_scse_cpu", (0,), (0.9,)), ("mr_scse_bf16", (0,), (0.85,))):
        for fold, value in zip(folds, dice):
            (tmp_path / name / "seed0" / f"fold{fold}").mkdir(parents=True)
            (tmp_path / name / "seed0" / f"fold{fold}" / "test_scores.csv").write_text("patient\n")
            for organ in ("liver", "spleen"):
                for postprocess, shift in (("none", -0.5), ("largest_component", 0.0)):
                    rows.append({"model": name, "patient": f"p{fold}", "organ": organ, "dice": value + shift,
                                 "postprocess": postprocess, "seed": 0, "fold": fold})
    with (tmp_path / "results.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = gpu_study.study_summary(tmp_path, folds=5, seeds=[0])
    assert summary["runs_planned"] == 15
    assert summary["runs_finished"] == [
        "mr_scse_bf16/seed0/fold0", "mr_scse_cpu/seed0/fold0", "mr_unet_cpu/seed0/fold0", "mr_unet_cpu/seed0/fold1"
    ]
    assert summary["folds_finished_by_all"] == ["seed0/fold0"]
    unet = summary["mean_dice_largest_component"]["mr_unet_cpu"]
    assert unet["all_finished_folds"] == pytest.approx(0.7) and unet["folds_finished_by_all"] == pytest.approx(0.8)
    assert summary["mean_dice_largest_component"]["mr_scse_cpu"]["folds_finished_by_all"] == pytest.approx(0.9)
    assert summary["mean_dice_largest_component"]["mr_scse_bf16"]["folds_finished_by_all"] == pytest.approx(0.85)


def test_commands_of_the_gpu_run_and_of_the_dry_run(gpu_study, tmp_path):
    with pytest.raises(SystemExit):
        gpu_study.parse_args([str(tmp_path / "out"), "--data", str(tmp_path)])  # no NIfTI there
    (tmp_path / "image_1.nii.gz").touch()
    args = gpu_study.parse_args([str(tmp_path / "out"), "--data", str(tmp_path), "--work", str(tmp_path / "w")])
    assert args.budget == 540 and not args.dry_run
    bench = gpu_study.bench_command(args, "bfloat16", tmp_path / "b.json")
    assert {"--device", "--compare-torch"} <= set(bench) and bench[bench.index("--dtype") + 1] == "bfloat16"
    assert bench[bench.index("--torch-modes") + 1] == "eager,compile"
    study = gpu_study.study_command(args)
    assert study[study.index("--folds") + 1] == "5"
    assert {f"--config.data.root={tmp_path.resolve()}", "--config.data.image_size=256", "--config.train.num_epochs=30"} <= set(study)
    assert "--config.train.steps_per_epoch=0" in study  # an epoch is one pass there, not the CPU recipe's 25 batches
    dry = gpu_study.parse_args([str(tmp_path / "out"), "--dry-run", "--data", str(tmp_path)])
    assert "--config.data.max_patients=4" in gpu_study.study_command(dry) and "--device" not in gpu_study.bench_command(
        dry, "float32", tmp_path / "b.json")
    assert gpu_study.study_command(dry, report_only=True)[-1] == "--report-only"


# --------------------------------------------------------------------------- the PyTorch reference


@pytest.fixture(scope="module")
def torch_reference():
    if not HAS_TORCH:
        pytest.skip("PyTorch is not installed (pip install torch to test the benchmark's reference network)")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP's spinning threads crawl on a busy 2-core machine
    yield load_module("torch_reference")
    torch.set_num_threads(threads)


def flax_variables(features: int, seed: int = 0):
    """A Flax UNet (configs/default.py's model, features wide) with non-trivial BatchNorm statistics."""
    import jax
    import jax.numpy as jnp

    from configs import default
    from scse_jax.state import build_model

    config = default.get_config()
    config.model.features = features
    model = build_model(config.model, 5)
    images = np.random.default_rng(seed).normal(size=(2, 32, 32, 1)).astype(np.float32)
    variables = model.init(jax.random.key(seed), images, train=False)
    rng = np.random.default_rng(seed + 1)

    def perturb(path, leaf):
        offset = 1.0 if path[-1].key == "var" else 0.0
        return jnp.asarray(offset + rng.uniform(-0.1, 0.1, leaf.shape), jnp.float32)

    stats = jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"])
    return model, {"params": variables["params"], "batch_stats": stats}, images


def test_torch_reference_has_the_project_networks_parameters(torch_reference):
    from scse_jax.models.unet import count_params

    for features, se in ((4, "scse"), (8, "none"), (4, "cse"), (4, "sse")):
        import jax

        from configs import default
        from scse_jax.state import build_model

        config = default.get_config()
        config.model.features, config.model.se = features, se
        shapes = jax.eval_shape(
            lambda: build_model(config.model, 5).init(jax.random.key(0), np.zeros((1, 32, 32, 1)), train=False)
        )
        assert count_params(shapes["params"]) == torch_reference.count_params(
            torch_reference.UNet(features=features, se=se)
        ), (features, se)


def test_torch_reference_gives_the_project_networks_logits(torch_reference):
    import torch

    model, variables, images = flax_variables(features=4)
    reference = torch_reference.UNet(features=4)
    torch_reference.load_flax_variables(reference, variables)
    for train in (False, True):
        reference.train(train)
        with torch.no_grad():
            ours = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        if train:
            theirs, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        else:
            theirs = model.apply(variables, images, train=False)
        np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-4, rtol=1e-4, err_msg=f"train={train}")


def test_torch_reference_steps_train_and_predict(torch_reference):
    reference = torch_reference.Reference(batch=2, size=32, features=4, se="scse", dtype="bfloat16", device="cpu",
                                          modes=("eager",))
    assert reference.settings["precision"] == "autocast bfloat16, float32 parameters" and not reference.errors
    model = reference.models["eager"]
    before = [parameter.detach().clone() for parameter in model.parameters()]
    train_step, infer_step = reference.steps["eager"]
    loss = train_step()
    assert math.isfinite(float(loss.detach())) and model.training
    assert all(not bool((a == b).all()) for a, b in zip(before, model.parameters()) if a.ndim == 4)  # every kernel moved
    labels = infer_step()
    assert not model.training and tuple(labels.shape) == (2, 32, 32) and int(labels.max()) < torch_reference.NUM_CLASSES
    timed = reference.measure("eager", "train", 2)
    assert len(timed["times_s"]) == 2 and timed["median_s"] > 0
