"""Plot a training run: loss curves with stage boundaries, per-t-bin loss heatmap, CS channels, CR norms.

    python scripts/plot_run.py runs/twoscale_cs-20261122-101500        # → RUN_DIR/plots/*.png
"""

from __future__ import annotations

import argparse

from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.training.plots import plot_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by train_curriculum.py")
    p.add_argument("--out", help="output folder (default RUN_DIR/plots)")
    args = p.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
