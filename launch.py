"""Trains and evaluates one run: python launch.py --config configs/mr_scse.py [--workdir DIR].

Any config field can be overridden, e.g. --config.train.num_epochs=2.
"""

import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (default: runs/<config name>-<time>).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from scse_jax import train
    from scse_jax.errors import ScseError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and JAX log every save at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or str(Path("runs") / f"{Path(flags.FLAGS['config'].config_filename).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        train.train_and_evaluate(config, workdir)
    except ScseError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, always
        sys.exit(1)
    except KeyboardInterrupt:  # before training started: nothing was saved, nothing to resume
        print("error: interrupted before training started", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main)
