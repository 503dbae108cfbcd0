"""launch.py keeps compiled steps beside the prepared data, so that a repeated run compiles nothing."""

from tests._launch import launch_args, run_to_end, subprocess_env, write_tiny_tree


def test_a_repeated_run_finds_every_compiled_program_in_the_cache(tmp_path):
    data_root = write_tiny_tree(tmp_path / "chaos")
    cache_dir = tmp_path / "cache"
    env = subprocess_env()
    del env["JAX_COMPILATION_CACHE_DIR"]  # launch.py's own choice: <data.cache_dir>/xla

    def entries():  # compiled programs and when they were written (a hit only touches "-atime" files)
        return {p.name: p.stat().st_mtime_ns for p in (cache_dir / "xla").iterdir() if not p.name.endswith("-atime")}

    first = run_to_end(launch_args(tmp_path / "run1", data_root, cache_dir), env)
    assert first.process.returncode == 0, first.output
    after_first = entries()
    assert any("train_step" in name for name in after_first), after_first
    second = run_to_end(launch_args(tmp_path / "run2", data_root, cache_dir), env)
    assert second.process.returncode == 0, second.output
    assert entries() == after_first  # nothing compiled or written again


def test_cpu_devices_flag_splits_the_cpu_and_is_checked_against_the_batch(tmp_path):
    data_root = write_tiny_tree(tmp_path / "chaos")
    two = run_to_end(launch_args(tmp_path / "two", data_root, tmp_path / "cache", "--cpu_devices=2"), subprocess_env())
    assert two.process.returncode == 0, two.output
    assert "Training on 2 cpu device(s) in 1 process(es), global batch 8" in two.stdout
    three = run_to_end(launch_args(tmp_path / "three", data_root, tmp_path / "cache", "--cpu_devices=3"), subprocess_env())
    assert three.process.returncode == 1
    assert three.stderr[-1] == (
        "error: config.train.batch_size: 8 must be a positive multiple of the device count (3)"
    ), three.output
