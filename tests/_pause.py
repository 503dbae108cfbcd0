"""``launch.py`` stopped at one moment of its run, so that a fault test kills it exactly there.

``python -m tests._pause POINT MARKER launch.py ARGS...`` runs ``launch.py ARGS...``; at POINT the
run creates the file MARKER and sleeps until it is killed. POINT is one of
  save:STEP   the save of checkpoint STEP, its files written, before orbax commits it (its rename)
  eval:EPOCH  the validation of EPOCH, just begun (its train record is written)
  step:STEP   step STEP, done, before it is reported
However slowly the machine runs, the kill cannot land before or after the moment it is meant for.
"""

import os
import runpy
import sys
import time
from pathlib import Path

from scse_jax import run_log, train


def _pause(marker: str) -> None:
    Path(marker).touch()
    while True:
        time.sleep(60)


def install(point: str, marker: str) -> None:
    kind, number = point.split(":")
    number = int(number)
    if kind == "save":
        rename = os.rename

        def committing(src, dst, *args, **kwargs):
            if Path(src).name.startswith(f"{number}.orbax-checkpoint-tmp"):
                _pause(marker)
            return rename(src, dst, *args, **kwargs)

        os.rename = committing
    elif kind == "eval":
        record, validate = run_log.RunLog.record, train.validate
        last_record = []

        def recording(self, split, epoch, *args, **kwargs):
            last_record[:] = [(split, epoch)]
            return record(self, split, epoch, *args, **kwargs)

        def evaluating(*args, **kwargs):
            if last_record == [("train", number)]:
                _pause(marker)
            return validate(*args, **kwargs)

        run_log.RunLog.record = recording
        train.validate = evaluating
    elif kind == "step":
        progress_line = train.progress_line

        def reporting(step, *args, **kwargs):
            if step == number:
                _pause(marker)
            return progress_line(step, *args, **kwargs)

        train.progress_line = reporting
    else:
        raise ValueError(f"unknown pause point {point!r}")


if __name__ == "__main__":
    point, marker, script, *args = sys.argv[1:]
    install(point, marker)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
