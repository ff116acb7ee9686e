"""sharnn training: `accelerate launch -m train --preset NAME --data CORPUS --out RUN_DIR`."""
