"""The shipped Fashion-MNIST DVT at reduced precision against PyTorch fp32, on all 10,000 test images.

For each parity target of parity_tests/targets.py (`ascend-fp16`: MindSpore graph mode computing
as Ascend does; `bf16` and `fp16`: PyTorch autocast): accuracy per exit, predictions equal to fp32's, max
|d logit| against its bound, and exit decisions with the shipped thresholds (same exit, and the
share of samples within the decision margin of a threshold), printed as a table and plotted.

    .venv/bin/python benchmarks/precision_agreement.py [--images 10000] [--targets ascend-fp16 bf16] \\
        [--png out/precision.png]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from common import MINDSPORE_DEFAULT_GLOG_V, print_table

REPO = Path(__file__).resolve().parents[1]
# parity_tests is not an installed package; its targets hold every bound this script reports.
sys.path.insert(0, str(REPO))


def plot(accuracy: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dvt_shared.io_utils import atomic_write_png

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    width = 0.8 / len(accuracy)
    for i, (label, values) in enumerate(accuracy.items()):
        ax.bar(np.arange(len(values)) + i * width, values, width, label=label)
    low = min(min(v) for v in accuracy.values())
    ax.set(xlabel="exit", ylabel="top-1 accuracy (%)", ylim=(low - 1.0, None),
           title="shipped Fashion-MNIST DVT: accuracy per exit and precision")
    ax.set_xticks(np.arange(len(next(iter(accuracy.values())))) + 0.4 - width / 2)
    ax.set_xticklabels([str(k) for k in range(len(next(iter(accuracy.values()))))])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_png(path, fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000, help="first N test images (default all 10,000)")
    parser.add_argument("--targets", nargs="+", default=["ascend-fp16", "bf16", "fp16"])
    parser.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--png", default="out/precision_agreement.png", help="plot path ('' for none)")
    parser.add_argument("--verbose", action="store_true", help="show MindSpore's C++ log lines")
    args = parser.parse_args()
    if args.verbose:
        os.environ["GLOG_v"] = MINDSPORE_DEFAULT_GLOG_V

    import mindspore as ms
    import torch

    from dvt_shared.datasets import load_fashion_mnist, normalise_fashion_mnist
    from dvt_shared.weight_format import load_canonical
    from dvt_torch import DVT
    from dvt_torch.convert import from_canonical
    from parity_tests.precision import decision_agreement, fp32_logits, logit_agreement, reduced_logits
    from parity_tests.targets import PRECISION_TARGETS

    torch.set_num_threads(1)
    ms.set_context(mode=ms.GRAPH_MODE)
    targets = {t.name: t for t in PRECISION_TARGETS}
    unknown = set(args.targets) - set(targets)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {sorted(targets)}")
    tensors, meta = load_canonical(REPO / "weights" / "dvt_t2t_vit_fmnist.safetensors")
    model = from_canonical(DVT(meta.config), tensors).eval()
    data = load_fashion_mnist(args.data_dir)
    x = normalise_fashion_mnist(data["test_images"][: args.images])
    labels = data["test_labels"][: args.images]

    reference = fp32_logits(model, x)
    accuracy = {"fp32": ((reference.argmax(-1) == labels[None]).mean(axis=1) * 100).tolist()}
    logit_rows, decision_rows = [], []
    for name in args.targets:
        target = targets[name]
        reduced = reduced_logits(target, model, x, batch=500)
        accuracy[f"{name} ({target.precision})"] = ((reduced.argmax(-1) == labels[None]).mean(axis=1) * 100).tolist()
        agreements = logit_agreement(target, reference, reduced, meta.config.depth)
        for k, a in enumerate(agreements):
            same = int((reduced[k].argmax(-1) == reference[k].argmax(-1)).sum())
            logit_rows.append([name, k, f"{accuracy['fp32'][k]:.2f}", f"{accuracy[list(accuracy)[-1]][k]:.2f}",
                               f"{same} / {len(x)}", f"{a.max_delta:.2e}", f"{a.factor:.2f}", f"{a.bound:.1e}",
                               "ok" if a.ok else "EXCEEDED"])
        d = decision_agreement(target, reference, reduced, meta.thresholds, agreements)
        decision_rows.append([name, f"{d.samples - d.differ} / {d.samples}", d.differ, len(d.unexplained),
                              f"{d.margin:.1e}", f"{d.borderline} ({d.borderline_share:.2%})",
                              f"{target.max_changed_share:.0%}"])
    print(f"Shipped {meta.config.name} on {len(x)} Fashion-MNIST test images, thresholds {meta.thresholds}")
    print_table(["target", "exit", "fp32 acc %", "acc %", "same prediction", "max |dlogit|", "u-units",
                 "bound", ""], logit_rows)
    print()
    print_table(["target", "same exit", "differ", "differ, not borderline", "margin", "borderline",
                 "differ bound"], decision_rows)
    if args.png:
        plot(accuracy, Path(args.png))
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
