"""`accelerate launch -m train --preset tiny --data CORPUS --out RUN_DIR`, or `python -m train ...`."""

import sys

from train.loop import main


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
