"""Issue 3's lottery-ticket table: lenet300 on Fashion-MNIST, iterative magnitude pruning at rate 0.2.

    .venv/bin/python -m bench.lottery [ROUNDS]

Each round prunes 20% of the remaining weights (global magnitude), rewinds the survivors to
their values after epoch 1 and trains them for the remaining 9 epochs (the ticket); the same
mask from a fresh random initialisation is trained for all 10 epochs (the control). 14 rounds
reach 4.4% of the weights; the table says whether tickets beat the control at about 10% and
5% remaining. Same command as ``slimkit lottery --model zoo:lenet300 --data idx:... --rounds 14
--rate 0.2 --rewind-epoch 1 --epochs 10``.
"""

from __future__ import annotations

import sys

from bench._common import CACHE, fashion_mnist, markdown_table, write_section

ROUNDS, RATE, REWIND, EPOCHS = 14, 0.2, 1, 10


def main() -> None:
    from slimkit.methods.prune import LotteryConfig, lottery
    from slimkit.training import TrainConfig

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS
    data = fashion_mnist()
    res = lottery("zoo:lenet300", data, LotteryConfig(rounds=rounds, rate=RATE, rewind_epoch=REWIND),
                  train=TrainConfig(epochs=EPOCHS, seed=0), out=CACHE / "lottery-lenet300", overwrite=True)
    rows = res.report["rounds"]
    table = [[r["round"], f"{r['remaining']:.1%}", f"{r['nonzero_weights']:,}", f"{r['ticket_accuracy']:.4f}",
              f"{r['control_accuracy']:.4f}", f"{(r['ticket_accuracy'] - r['control_accuracy']) * 100:+.2f}"]
             for r in rows]
    verdicts = []
    for goal in (0.10, 0.05):
        r = min(rows[1:], key=lambda row: abs(row["remaining"] - goal))
        gap = (r["ticket_accuracy"] - r["control_accuracy"]) * 100
        verdicts.append(f"at {r['remaining']:.1%} of the weights (round {r['round']}, nearest to {goal:.0%}) the ticket "
                        f"{'beats' if gap > 0 else 'does not beat'} the random-reinit control: "
                        f"{r['ticket_accuracy']:.4f} vs {r['control_accuracy']:.4f} ({gap:+.2f} pt)")
    dense = rows[0]["ticket_accuracy"]
    body = (
        f"`zoo:lenet300`, {EPOCHS} epochs of Adam 1e-3 (cosine, batch 128) per network, seed 0, one run. Round 0 is the "
        f"dense network. Each round prunes {RATE:.0%} of the remaining weights of the previous round's trained ticket "
        f"(global magnitude, every layer keeps at least 2%), rewinds the survivors to their values after epoch {REWIND} "
        f"and trains {EPOCHS - REWIND} epochs with the mask held (ticket); the control trains the same mask from a "
        f"fresh random initialisation for all {EPOCHS} epochs. Test accuracy on the Fashion-MNIST test split "
        f"(dense: {dense:.4f}). Took {res.report['seconds'] / 60:.0f} min.\n\n"
        + markdown_table(["round", "weights remaining", "non-zero weights", "ticket test acc.", "random-reinit test acc.",
                          "ticket - control (pt)"], table)
        + "\n\n" + "; ".join(verdicts).capitalize() + "."
    )
    write_section("lottery", "Lottery tickets: lenet300, rate 0.2 (issue 3)", body)


if __name__ == "__main__":
    main()
