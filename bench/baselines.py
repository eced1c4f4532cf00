"""Train (once, cached in bench/.cache) the Fashion-MNIST baselines every benchmark starts from.

    .venv/bin/python -m bench.baselines [--device cuda] [NAME ...]

``--device cuda`` trains missing baselines on a GPU (same loop, same settings); the benchmarks
then load them on the CPU like any other.
"""

from __future__ import annotations

import sys

from bench._common import BASELINES, baseline, fashion_mnist, markdown_table, pop_option, write_section
from slimkit.measure import count_macs, count_params


def main() -> None:
    args = sys.argv[1:]
    device = pop_option(args, "--device", "cpu")
    names = args or list(BASELINES)
    data = fashion_mnist()
    rows = []
    for name in names:
        model, _, rep = baseline(name, data, device=device)
        rows.append([f"`{BASELINES[name]['spec']}`", BASELINES[name]["epochs"], f"{count_params(model)['params']:,}",
                     f"{count_macs(model, data.input_shape):,}", f"{rep['test_accuracy']:.4f}",
                     f"{rep['seconds']:.0f} s on {rep['config'].get('device', 'cpu')}"])
    write_section("baselines", "Fashion-MNIST baselines (trained once, shared by every benchmark)",
                  "Adam 1e-3, cosine schedule, batch 128, seed 0; the model with the best validation accuracy is kept.\n\n"
                  + markdown_table(["model", "epochs", "params", "MACs", "test accuracy", "training time"], rows)
                  + "\n\nTraining happens once; `--device cuda` trains on a GPU where one is lent (the same loop and "
                    "settings), every benchmark then loads the cached weights and measures on this machine's CPU.")


if __name__ == "__main__":
    main()
