"""Bad configs and bad checkpoints through ``launch.py``: one clear line, non-zero exit, no traceback,
nothing written. Also the security rules: no pickle or code execution on any load path.

The data readers' bad input and fuzzing live in test_readers.py; the cache's in test_preprocess.py.
"""

import ast
import contextlib
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests._launch import (
    REPO,
    complete_steps,
    launch_args,
    restore_state,
    run_to_end,
    subprocess_env,
    write_tiny_tree,
)
from scse_jax import train
from scse_jax.errors import CheckpointError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    return write_tiny_tree(root / "chaos"), root / "cache"


def assert_one_clear_line(run, *culprits: str) -> str:
    """Non-zero exit, no traceback, and the error is one line naming every culprit."""
    assert run.process.returncode not in (0, None), run.output
    assert not any("Traceback" in line or line.startswith("ERROR") for line in run.stderr), run.output
    # stderr also carries the data preparation's progress lines; absl adds a hint after FATAL.
    errors = [line for line in run.stderr if line.startswith(("error:", "FATAL"))]
    assert len(errors) == 1, run.output
    for culprit in culprits:
        assert culprit in errors[0], run.output
    return errors[0]


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "override, culprits",
    [
        ("--config.train.num_epoch=2", ["error: a --config override names no config field", 'Did you mean "num_epochs"']),
        ("--config.train.num_epochs=two", ["FATAL Flags parsing error", "two"]),
        ("--config.data.image_size=40", ["error: config.data.image_size", "multiple of 16"]),
        ("--config.train.batch_size=12", ["error: config.train.batch_size", "device count (8)"]),
        ("--config.train.num_epochs=0", ["error: config.train.num_epochs", "> 0"]),
        ("--config.data.root=/no/such/chaos", ["error: config.data.root", "/no/such/chaos", "does not exist"]),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(data, tmp_path, override, culprits):
    workdir = tmp_path / "run"
    run = run_to_end(launch_args(workdir, *data, override), env=subprocess_env(devices=8))
    assert_one_clear_line(run, *culprits)
    assert not workdir.exists()


@pytest.mark.parametrize("problem", ["missing", "syntax error"])
def test_unloadable_config_file_is_one_line(data, tmp_path, problem):
    config_file = tmp_path / "my_config.py"
    if problem == "syntax error":
        config_file.write_text("def get_config(:\n")
    args = [str(config_file) if arg == "configs/default.py" else arg for arg in launch_args(tmp_path / "run", *data)]
    run = run_to_end(args)
    line = assert_one_clear_line(run, "error:", str(config_file))
    assert ("No such file" in line) if problem == "missing" else ("invalid syntax" in line)
    assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_is_one_line(data, tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a folder")
    run = run_to_end(launch_args(workdir, *data))
    assert_one_clear_line(run, "error: --workdir", str(workdir))
    assert workdir.read_text() == "not a folder"


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished one-epoch run (one checkpoint, step 2); copy it before changing it."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    run = run_to_end(launch_args(workdir, *data, "--config.train.num_epochs=1"))
    assert run.process.returncode == 0, run.output
    return workdir


@pytest.fixture
def copy_of_trained(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def state_files(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "checkpoints" / "2" / "state").rglob("*") if p.is_file())


def test_checkpoint_of_another_model_is_one_line(copy_of_trained, data):
    before = snapshot(copy_of_trained)
    run = run_to_end(launch_args(copy_of_trained, *data, "--config.model.features=8"))
    assert_one_clear_line(run, "error: the checkpoint in", "features: checkpoint 4 vs config 8")
    assert snapshot(copy_of_trained) == before


def test_truncated_checkpoint_is_one_line(copy_of_trained, data):
    for path in state_files(copy_of_trained):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = snapshot(copy_of_trained)
    run = run_to_end(launch_args(copy_of_trained, *data))
    assert_one_clear_line(run, "error: checkpoint", "checkpoints/2", "corrupt")
    assert snapshot(copy_of_trained) == before


def test_foreign_files_in_the_checkpoint_folder_are_one_line(copy_of_trained, data):
    (copy_of_trained / "checkpoints" / "model.pt").write_bytes(b"\x80\x04not ours")
    before = snapshot(copy_of_trained)
    run = run_to_end(launch_args(copy_of_trained, *data, "--config.train.num_epochs=2"))
    assert_one_clear_line(run, "error:", "model.pt", "not scse_jax checkpoints")
    assert snapshot(copy_of_trained) == before


@pytest.mark.parametrize("damage", ["flip_data_bytes", "garble_every_file", "delete_array_files"])
def test_damaged_state_is_a_checkpoint_error(copy_of_trained, damage):
    files = state_files(copy_of_trained)
    data_files = [p for p in files if p.parent.name == "d"]
    assert data_files
    if damage == "flip_data_bytes":
        for path in data_files:
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 3 :: 7] = bytes(b ^ 0xFF for b in raw[len(raw) // 3 :: 7])
            path.write_bytes(bytes(raw))
    elif damage == "garble_every_file":
        for path in files:
            path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()))
    else:
        for path in data_files:
            path.unlink()
    with pytest.raises(CheckpointError, match="corrupt"):
        restore_state(copy_of_trained, 2)


@pytest.mark.parametrize(
    "make_foreign",
    [
        "numbered_folders_with_random_files",
        "orbax_checkpoint_without_meta",
        "meta_that_is_not_ours",
    ],
)
def test_checkpoints_from_another_program_are_refused(copy_of_trained, tiny_config_for, make_foreign):
    ckpt_dir = copy_of_trained / "checkpoints"
    if make_foreign == "numbered_folders_with_random_files":
        shutil.rmtree(ckpt_dir)
        for step in ("3", "17"):
            (ckpt_dir / step).mkdir(parents=True)
            (ckpt_dir / step / "weights.bin").write_bytes(np.random.default_rng(0).bytes(1000))
    elif make_foreign == "orbax_checkpoint_without_meta":
        shutil.rmtree(ckpt_dir / "2" / "meta")
    else:
        (ckpt_dir / "2" / "meta" / "metadata").write_text('["a list, not our meta"]')
    before = snapshot(copy_of_trained)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(CheckpointError, match="not .*scse_jax checkpoint"):
        train.train_and_evaluate(tiny_config_for(copy_of_trained), copy_of_trained)
    assert snapshot(copy_of_trained) == before


@pytest.fixture
def tiny_config_for(data):
    """The in-process twin of launch_args' config (8 fake devices in this process, batch 8)."""
    from configs import default

    def make(workdir):
        config = default.get_config()
        config.data.root, config.data.cache_dir = str(data[0]), str(data[1])
        config.data.image_size, config.data.num_folds = 32, 4
        config.model.features = 4
        config.train.batch_size = config.eval.batch_size = 8
        config.train.num_epochs = 2
        return config

    return make


# --------------------------------------------------------------------------- security

LOAD_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "torch"}


def python_sources() -> list[Path]:
    return sorted((REPO / "scse_jax").rglob("*.py")) + [REPO / "launch.py"] + sorted((REPO / "configs").glob("*.py"))


def unsafe_calls(path: Path) -> list[str]:
    """Imports of unpickling modules, eval/exec/__import__, and np.load without allow_pickle=False."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in LOAD_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LOAD_MODULES:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__", "compile"):
                found.append(f"{where} {func.id}()")
            if isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) in ("np", "numpy"):
                safe = any(
                    k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in node.keywords
                )
                if not safe:
                    found.append(f"{where} np.load without allow_pickle=False")
            if isinstance(func, ast.Attribute) and func.attr in ("load", "loads", "unsafe_load"):
                if ast.unparse(func.value) in ("yaml", "torch", "pickle", "marshal", "dill"):
                    found.append(f"{where} {ast.unparse(func)}()")
    return found


def test_no_pickle_or_code_execution_in_the_package():
    sources = python_sources()
    assert len(sources) > 20
    problems = [problem for path in sources for problem in unsafe_calls(path)]
    assert problems == []


def test_the_scan_catches_what_it_forbids(tmp_path):
    bad = REPO / "scse_jax" / "_scan_probe_never_committed.py"
    bad.write_text(
        "import pickle\nimport numpy as np\nnp.load('x.npy')\nnp.load('x.npy', allow_pickle=True)\neval('1')\n"
    )
    try:
        found = unsafe_calls(bad)
    finally:
        bad.unlink()
    assert len(found) == 4, found


def test_restoring_a_checkpoint_never_unpickles(trained, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during a restore")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    state = restore_state(trained, 2)
    assert int(state.step) == 2
    assert complete_steps(trained / "checkpoints") == [2]
