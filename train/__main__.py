"""`accelerate launch -m train --preset tiny --data CORPUS --out RUN_DIR`, or `python -m train ...`; and the
console entry points of the commands in train/ (setup.cfg), which import them as sharnn.entry.run does."""

import functools

from sharnn.entry import run

console_main = functools.partial(run, "train.loop")  # sharnn-train
evaluate = functools.partial(run, "train.eval_command")  # sharnn-eval
export = functools.partial(run, "train.export")  # sharnn-export

if __name__ == "__main__":
    console_main()
