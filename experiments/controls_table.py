"""A markdown table of learning-curve summaries (final / area under the curve) for labelled runs.

    python experiments/controls_table.py "NTP=experiments/results/from_scratch/controls/demo_ntp" \
        "PRIOR alpha 0.5=experiments/results/from_scratch/controls/prior_alpha0.5"
"""

from __future__ import annotations

import sys

from prior.eval.compare import load_curve, summarize

METRICS = (
    "test_counter/choice_accuracy_color",
    "test_counter/prior_pick_rate",
    "test/choice_accuracy",
    "test_counter/color_hallucination",
    "test/bleu4",
    "test/perplexity",
)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    runs = dict(arg.split("=", 1) for arg in argv)
    print("| run | " + " | ".join(f"{m} final / AUC" for m in METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for label, folder in runs.items():
        curve = load_curve(folder)
        cells = [f"{s.final[0]:.3f} / {s.auc[0]:.3f}" for s in (summarize([curve], m) for m in METRICS)]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
