"""Trains and evaluates one run: python launch.py --config configs/mr_scse.py [--workdir DIR].

Any config field can be overridden, e.g. --config.train.num_epochs=2.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder (default: runs/<config name>, so the same command resumes or reports a run)."
)
_CPU_DEVICES = flags.DEFINE_string(
    "cpu_devices", "auto",
    "JAX devices the CPU is split into: 'auto' (one per physical core, as many as divide the batches) or a count; "
    "1 for a single device.",
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from scse_jax import sharding
    from scse_jax.errors import RunStopped, ScseError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and JAX log every save at INFO
    config = _CONFIG.value
    try:
        config.keys()  # ml_collections defers a config file's load error to the first use
    except OSError as error:
        _config_file_error(error)
    if sharding.is_supervised():
        sharding.stop_with_parent()
    elif sharding.is_multi_process(config.distributed):
        sys.exit(sharding.supervise([sys.executable, *sys.orig_argv[1:]]))
    from scse_jax import compilation, cpu_layout, train

    compilation.use_compilation_cache(config.data)
    try:
        cpu_layout.set_up(
            _CPU_DEVICES.value,
            (config.train.batch_size, config.eval.batch_size),
            multi_process=sharding.is_multi_process(config.distributed),
        )
        workdir = _WORKDIR.value or str(Path("runs") / Path(flags.FLAGS["config"].config_filename).stem)
        train.train_and_evaluate(config, workdir)
    except RunStopped as stopped:  # asked for: the checkpoint is saved
        print(stopped, flush=True)
    except ScseError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, always
        sys.exit(1)
    except KeyboardInterrupt:  # outside the training steps, where SIGINT is not turned into a save
        print("error: interrupted; the same command resumes from the latest checkpoint, if any", file=sys.stderr)
        sys.exit(130)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, plus one clean line for a misspelt override or a config file that does not parse."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:  # what ml_collections raises for a misspelt key
        reason = error
        while isinstance(reason, BaseException) and reason.args:
            reason = reason.args[0]
        print(f"error: a --config override names no config field: {' '.join(str(reason).split())}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a missing config file, met while applying the overrides
        _config_file_error(error)
    except SyntaxError as error:  # a config file is Python; its line is worth more than a traceback
        print(f"error: config file {error.filename}:{error.lineno}: {error.msg}", file=sys.stderr)
        sys.exit(2)


def _config_file_error(error: OSError) -> None:
    reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
    print(f"error: cannot load the --config file ({reason})", file=sys.stderr)  # the reason names the file
    sys.exit(2)


def run(argv):
    """main, in a multi-process run ended at once when it fails (see sharding)."""
    from scse_jax import sharding

    with sharding.exit_at_once_on_failure():
        main(argv)


if __name__ == "__main__":
    from scse_jax import hugepages

    hugepages.restart_with_hugepages("launch.py")
    app.run(run, flags_parser=parse_flags)
