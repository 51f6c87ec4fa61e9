"""`dvt evaluate` and `dvt demo`: per-exit accuracy, the accuracy-compute curve, both backends.

Any labelled data set `--data` names (`dvt_shared.data_sources`: Fashion-MNIST, an image folder,
parquet files), read as each model's weights say (their data config). Thresholds are always found on
held-out training images and evaluated on the val split (Fashion-MNIST's test set), as the release does.
A single-exit classifier (VT-ResNet, ResNet) gets its accuracy,
GFLOPs and parameters instead, side by side with the baseline's when one is given. The
report is written as Markdown, JSON and a PNG plot under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from dvt_shared.exit_policy import softmax
from dvt_shared.io_utils import atomic_write_bytes, atomic_write_png
from dvt_shared.models import ModelConfig, family_of

from . import CommandError, backends, read_weights
from .inference import SCORING_BACKEND, all_exit_logits

BUDGET_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
CALIBRATION_IMAGES = 10000
# PyTorch's fp32 reference passes run 128 images at a time: 1.09-1.14 ms per image on this 2-core
# CPU against 1.28-1.43 at 256 (batches that fit its caches).
SCORING_BATCH = 128


class EvaluationSet:
    """The data set an evaluation reads: its val split whole (the test images) and a fixed draw of
    CALIBRATION_IMAGES training images (for thresholds), decoded once per data config."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._decoded: dict = {}

    @property
    def title(self) -> str:
        """What the report calls the images it scores."""
        from dvt_shared.data_sources import FMNIST

        if self.dataset.kind == FMNIST:
            return "the Fashion-MNIST test set"
        return f"{self.dataset.location} (val split, {len(self.dataset.val)} images)"

    def arrays(self, data) -> dict[str, np.ndarray]:
        """test_images, test_labels, calib_images, calib_labels: float32 inputs as `data` (a DataConfig) reads
        them, int64 labels."""
        from .datasets import split_images

        if data not in self._decoded:
            test_images, test_labels = split_images(self.dataset, "val", data)
            calib_images, calib_labels = split_images(self.dataset, "train", data, CALIBRATION_IMAGES)
            self._decoded[data] = {"test_images": test_images, "test_labels": test_labels,
                                   "calib_images": calib_images, "calib_labels": calib_labels}
        return self._decoded[data]


@dataclass
class Evaluated:
    config: ModelConfig
    tensors: dict
    thresholds: list[float] | None
    test_logits: np.ndarray  # (exits, n, classes) of the scoring backend, fp32
    calib_probs: np.ndarray | None  # held-out training images, for thresholds (DVT only)
    params: int  # trainable parameters
    engines: dict = field(default_factory=dict, repr=False)  # (backend, precision) -> early-exit engine
    inputs: dict = field(default_factory=dict, repr=False)  # the arrays of EvaluationSet.arrays it was scored on
    exit_policy: str = "max-softmax"  # the policy of `thresholds`

    @cached_property
    def test_probs(self) -> np.ndarray:
        return softmax(self.test_logits)

    def engine(self, backend: str, precision: str = "fp32"):
        """This DVT's early-exit engine on `backend` at `precision`, built on first use and kept, so that
        every pass through it (the agreement checks, the demo's timings) runs the same compiled stages:
        MindSpore compiles each stage once per batch shape, several seconds each on a CPU. Its
        thresholds are the model's, or every image to the last exit for an uncalibrated one."""
        from dvt_shared.exit_policy import last_exit_only

        key = (backend, precision)
        if key not in self.engines:
            thresholds = self.thresholds or last_exit_only(self.config.num_exits)
            self.engines[key] = backends.engine(backend, self.config, self.tensors, thresholds, precision=precision)
        return self.engines[key]

    def exit_logits(self, images: np.ndarray, backend: str, precision: str = "fp32") -> np.ndarray:
        """(exits, n, classes) logits of every exit on `images`, through `engine(backend, precision)`."""
        from tqdm import tqdm

        from dvt_shared.adaptive import even_chunks

        engine = self.engine(backend, precision)
        chunks = tqdm(even_chunks(len(images), engine.max_batch), desc=f"{backend} {precision}", unit="batch",
                      leave=False)
        return np.concatenate([engine.all_exit_logits(images[a:b]) for a, b in chunks], axis=1)


def fashion_mnist(data_dir: str | None) -> EvaluationSet:
    """The embedded Fashion-MNIST as an evaluation set (its test images, a fixed draw of its training images)."""
    from dvt_shared.data_sources import FMNIST, open_data

    return EvaluationSet(open_data(FMNIST, data_dir=data_dir))


def evaluation_set(args) -> EvaluationSet:
    """The data set `--data` and its options name, opened and checked (nothing decoded yet)."""
    from dvt_shared.data_sources import DataError, open_data

    try:
        return EvaluationSet(open_data(args.data, args.val_split, args.seed, args.data_dir, args.label_column))
    except (DataError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from exc


def score(path: str, data: EvaluationSet, calibrate: bool = True) -> Evaluated:
    from dvt_shared.data_sources import DataError, check_classes

    from .datasets import model_data

    config, tensors, metadata, _ = read_weights(path)
    model_input = model_data(config, metadata, path)
    try:
        check_classes(data.dataset, model_input, config.num_classes, path)
    except DataError as exc:
        raise CommandError(str(exc)) from exc
    inputs = data.arrays(model_input)
    facade = backends.load(SCORING_BACKEND)
    model = facade.inference_model(config, tensors)
    # Only a cascade has thresholds to find.
    calibrate = calibrate and family_of(config).cascade

    def logits(images: np.ndarray) -> np.ndarray:
        return facade.all_exit_logits(model, images, SCORING_BATCH)

    return Evaluated(
        config, tensors, metadata.thresholds if metadata is not None else None,
        logits(inputs["test_images"]), softmax(logits(inputs["calib_images"])) if calibrate else None,
        facade.count_parameters(model), inputs=inputs,
        exit_policy=metadata.exit_policy if metadata is not None else "max-softmax",
    )


def calibrated_point(dvt: Evaluated, labels: np.ndarray) -> dict | None:
    """Accuracy, average GFLOPs and exit shares on the test images at the thresholds the weights store."""
    from dvt_shared.calibration import dynamic_evaluate
    from dvt_shared.exit_policy import exit_policy
    from dvt_shared.flops import exit_gflops

    if not dvt.thresholds:
        return None
    gflops = np.asarray(exit_gflops(dvt.config))
    policy = exit_policy(dvt.exit_policy)
    result = dynamic_evaluate(dvt.test_probs, labels, gflops, np.asarray(dvt.thresholds), policy)
    return {"thresholds": list(dvt.thresholds), "exit_policy": policy.name, "accuracy": result.accuracy,
            "gflops": result.expected_flops, "exit_shares": (result.exit_counts / len(labels)).tolist()}


def accuracy_compute_curve(dvt: Evaluated, labels: np.ndarray) -> dict:
    """Per-exit accuracy, the release's p sweep and budget targets, thresholds from the held-out images."""
    from dvt_shared import calibration
    from dvt_shared.flops import exit_gflops

    gflops = np.asarray(exit_gflops(dvt.config))
    per_exit = (dvt.test_probs.argmax(-1) == labels[None]).mean(axis=1) * 100
    sweep = [
        {"p": point.p, "accuracy": point.accuracy, "gflops": point.expected_flops}
        for point in calibration.release_sweep(dvt.test_probs, labels, gflops, calib_probs=dvt.calib_probs)
    ]
    budgets = []
    for fraction in BUDGET_FRACTIONS:
        budget = float(gflops[0] + fraction * (gflops[-1] - gflops[0]))
        thresholds = calibration.thresholds_for_budget(dvt.calib_probs, gflops, budget)
        result = calibration.dynamic_evaluate(dvt.test_probs, labels, gflops, thresholds)
        budgets.append({"budget": budget, "accuracy": result.accuracy, "gflops": result.expected_flops,
                        "exit_shares": (result.exit_counts / len(labels)).tolist(), "thresholds": thresholds.tolist()})
    return {"model": dvt.config.name, "exit_gflops": gflops.tolist(), "exit_accuracy": per_exit.tolist(),
            "p_sweep": sweep, "budgets": budgets}


def baseline_point(static: Evaluated, labels: np.ndarray) -> dict:
    """Accuracy (%), GFLOPs and parameters of a model's last exit."""
    from dvt_shared.models import model_gflops

    return {"model": static.config.name, "family": static.config.family, "gflops": model_gflops(static.config)[-1],
            "accuracy": float((static.test_probs[-1].argmax(-1) == labels).mean() * 100), "params": static.params}


def matching_budget(curve: dict, baseline: dict) -> dict | None:
    """The cheapest point of DVT's curve that reaches the baseline's accuracy."""
    points = [p for p in curve["p_sweep"] + curve["budgets"] if p["accuracy"] >= baseline["accuracy"]]
    return min(points, key=lambda p: p["gflops"]) if points else None


def candidate_backends() -> list[str]:
    """The backends whose agreement with the reference the evaluation reports (the parity pairs' candidates)."""
    return [candidate for _, candidate in backends.parity_pairs()]


def backend_agreement(dvt: Evaluated, images: np.ndarray, thresholds, backend: str) -> dict:
    """`backend`'s early-exit engine (graph mode where it has one) on the same images: per-exit predictions
    and exit decisions vs the reference's; samples within the fp32 decision margin of a threshold (derived in
    dvt_shared.error_bounds from each exit's logits) are counted as borderline."""
    from dvt_shared.error_bounds import FP32, decision_agreement
    from dvt_shared.exit_policy import MAX_SOFTMAX, confidences, exit_indices

    ms_probs = softmax(dvt.exit_logits(images, backend))
    torch_conf, ms_conf = confidences(dvt.test_probs), confidences(ms_probs)
    margins = MAX_SOFTMAX.margin(FP32.exit_bounds(dvt.config.depth, dvt.test_logits))
    agreement = decision_agreement(torch_conf, exit_indices(ms_conf, thresholds), thresholds, margins, ms_conf)
    same_class = dvt.test_probs.argmax(-1) == ms_probs.argmax(-1)
    return {
        "images": len(images),
        "same_prediction_per_exit": same_class.sum(axis=1).tolist(),
        "same_exit": agreement.samples - agreement.differ,
        "borderline": agreement.borderline,
        "margin": agreement.margin,
        "differ_not_borderline": int(agreement.unexplained.size),
        "max_abs_prob_delta": float(np.abs(dvt.test_probs - ms_probs).max()),
    }


def precision_agreement(
    dvt: Evaluated, images: np.ndarray, labels: np.ndarray, thresholds, backend: str, precision: str
) -> dict:
    """`backend` at a reduced `precision` against PyTorch fp32 on the same images (the first test images,
    which `dvt.test_probs` scored first): per-exit accuracy, same predictions, same exits."""
    from dvt_shared.exit_policy import confidences, exit_indices

    probs = softmax(dvt.exit_logits(images, backend, precision))
    reference = dvt.test_probs[:, :len(images)]
    runs_on = f"{backend} {precision}"
    ref_conf, conf = confidences(reference), confidences(probs)
    thresholds = np.asarray(thresholds, dtype=np.float32)
    ref_exit, got_exit = exit_indices(ref_conf, thresholds), exit_indices(conf, thresholds)
    # A sample switches exits only if a threshold lies between its two confidences.
    conf_delta = np.abs(conf - ref_conf)
    return {
        "precision": precision, "runs_on": runs_on, "images": len(images),
        "exit_accuracy": ((probs.argmax(-1) == labels[None]).mean(axis=1) * 100).tolist(),
        "same_prediction_per_exit": (probs.argmax(-1) == reference.argmax(-1)).sum(axis=1).tolist(),
        "same_exit": int((ref_exit == got_exit).sum()),
        "max_abs_conf_delta": float(conf_delta.max()),
    }


def plot(curve: dict, baseline: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    sweep = sorted(curve["p_sweep"], key=lambda p: p["gflops"])
    ax.plot([p["gflops"] * 1e3 for p in sweep], [p["accuracy"] for p in sweep], "-", color="tab:blue",
            label="DVT, release p sweep")
    ax.plot([p["gflops"] * 1e3 for p in curve["budgets"]], [p["accuracy"] for p in curve["budgets"]], "o",
            color="tab:blue", label="DVT, budget targets")
    ax.plot([g * 1e3 for g in curve["exit_gflops"]], curve["exit_accuracy"], "s--", color="tab:gray",
            label="DVT, every image at exit k")
    if baseline:
        ax.plot([baseline["gflops"] * 1e3], [baseline["accuracy"]], "*", color="tab:red", markersize=14,
                label="static baseline")
    ax.set_xlabel("average MFLOPs (multiply-adds) per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{curve['model']} on {title}: accuracy vs compute", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write_png(path, fig)


def markdown(report: dict) -> str:
    curve = report["dvt"]
    lines = [f"# {curve['model']} on {report['data']}", "",
             "| exit | cumulative MFLOPs | accuracy (%) |", "|---|---|---|"]
    lines += [f"| {k} | {g * 1e3:.2f} | {a:.2f} |"
              for k, (g, a) in enumerate(zip(curve["exit_gflops"], curve["exit_accuracy"]))]
    lines += ["", f"Budgeted classification (thresholds from {report.get('calibration_images', 10000):,} held-out "
                  "training images):", "",
              "| budget MFLOPs | spent MFLOPs | accuracy (%) | exit shares |", "|---|---|---|---|"]
    lines += [f"| {b['budget'] * 1e3:.2f} | {b['gflops'] * 1e3:.2f} | {b['accuracy']:.2f} | "
              f"{' / '.join(f'{s:.0%}' for s in b['exit_shares'])} |" for b in curve["budgets"]]
    calibrated = report.get("calibrated")
    if calibrated:
        lines += ["", f"At the thresholds stored with the weights ({calibrated['exit_policy']} "
                      f"{[round(t, 4) for t in calibrated['thresholds']]}): accuracy {calibrated['accuracy']:.2f}%, "
                      f"{calibrated['gflops'] * 1e3:.2f} MFLOPs per image, exit shares "
                      f"{' / '.join(f'{v:.0%}' for v in calibrated['exit_shares'])}."]
    baseline = report.get("baseline")
    if baseline:
        lines += ["", f"Static baseline {baseline['model']}: {baseline['accuracy']:.2f}% at "
                      f"{baseline['gflops'] * 1e3:.2f} MFLOPs."]
        match = report.get("dvt_matching_baseline")
        lines += [f"DVT reaches it at {match['gflops'] * 1e3:.2f} MFLOPs "
                  f"({match['gflops'] / baseline['gflops']:.0%} of the "
                  f"baseline's), accuracy {match['accuracy']:.2f}%." if match else
                  "DVT does not reach the baseline's accuracy on this curve."]
    for backend, agreement in report.get("agreement", {}).items():
        lines += ["", f"{backends.BACKENDS[backend].label} on the same {agreement['images']} images: same "
                  f"prediction per exit {agreement['same_prediction_per_exit']}, same exit {agreement['same_exit']} "
                  f"({agreement['borderline']} borderline within {agreement['margin']:.1e} of a threshold, "
                  f"{agreement['differ_not_borderline']} others differ), "
                  f"max |d prob| {agreement['max_abs_prob_delta']:.1e}."]
    lines += precision_lines(report.get("precisions", []))
    return "\n".join(lines) + "\n"


def precision_lines(agreements: list[dict]) -> list[str]:
    lines = []
    for a in agreements:
        lines += ["", f"{a['runs_on']} against PyTorch fp32 on the same {a['images']} images: accuracy per exit "
                  f"{' / '.join(f'{v:.2f}' for v in a['exit_accuracy'])} %, same prediction per exit "
                  f"{a['same_prediction_per_exit']}, same exit {a['same_exit']}, max |d confidence| "
                  f"{a['max_abs_conf_delta']:.1e}."]
    return lines


def classifier_agreement(evaluated: Evaluated, images: np.ndarray, backend: str) -> dict:
    """`backend` on the same images: predictions and probabilities vs the reference's."""
    ms_probs = softmax(all_exit_logits(evaluated.config, evaluated.tensors, images, backend=backend, batch=500)[-1])
    torch_probs = evaluated.test_probs[-1]
    return {
        "images": len(images),
        "same_prediction": int((torch_probs.argmax(-1) == ms_probs.argmax(-1)).sum()),
        "max_abs_prob_delta": float(np.abs(torch_probs - ms_probs).max()),
    }


def classifier_plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for point, colour in zip(points, ("tab:blue", "tab:red", "tab:green", "tab:gray")):
        ax.plot([point["gflops"] * 1e3], [point["accuracy"]], "o", color=colour, markersize=9,
                label=f"{point['model']} ({point['params'] / 1e6:.2f}M parameters)")
    ax.set_xlabel("MFLOPs (multiply-adds) per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: accuracy vs compute", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write_png(path, fig)


def classifier_markdown(report: dict) -> str:
    lines = [f"# {report['data']}", "", "| model | family | accuracy (%) | MFLOPs | parameters (M) |",
             "|---|---|---|---|---|"]
    lines += [f"| {p['model']} | {p['family']} | {p['accuracy']:.2f} | {p['gflops'] * 1e3:.2f} | "
              f"{p['params'] / 1e6:.3f} |" for p in report["classifiers"]]
    for backend, agreement in report.get("agreement", {}).items():
        lines += ["", f"{backends.BACKENDS[backend].label} on the same {agreement['images']} images "
                      f"({report['classifiers'][0]['model']}): same prediction {agreement['same_prediction']}, "
                      f"max |d prob| {agreement['max_abs_prob_delta']:.1e}."]
    return "\n".join(lines) + "\n"


def _cascade_report(
    dvt: Evaluated, weights: str, baseline: str | None, data: EvaluationSet, agreement: bool,
    precisions: tuple[tuple[str, str], ...] = (), precision_images: int | None = None,
) -> dict:
    images, labels = dvt.inputs["test_images"], dvt.inputs["test_labels"]
    if dvt.config.num_exits < 2:
        raise CommandError(f"{weights} holds a single-exit model; pass the DVT as --weights and it as --baseline")
    report = {"data": data.title, "calibration_images": len(dvt.inputs["calib_labels"]),
              "dvt": accuracy_compute_curve(dvt, labels)}
    if dvt.thresholds:
        report["calibrated"] = calibrated_point(dvt, labels)
    if baseline:
        report["baseline"] = baseline_point(score(baseline, data, calibrate=False), labels)
        report["dvt_matching_baseline"] = matching_budget(report["dvt"], report["baseline"])
    thresholds = dvt.thresholds or report["dvt"]["budgets"][len(BUDGET_FRACTIONS) // 2]["thresholds"]
    if agreement:
        report["agreement"] = {
            backend: backend_agreement(dvt, images, thresholds, backend)
            for backend in candidate_backends()
        }
    count = precision_images or len(labels)
    report["precisions"] = [
        precision_agreement(dvt, images[:count], labels[:count], thresholds, backend, precision)
        for backend, precision in precisions
    ]
    return report


def _classifier_report(model: Evaluated, baseline: str | None, data: EvaluationSet, agreement: bool) -> dict:
    labels = model.inputs["test_labels"]
    points = [baseline_point(model, labels)]
    if baseline:
        points.append(baseline_point(score(baseline, data, calibrate=False), labels))
    report = {"data": data.title, "classifiers": points}
    if agreement:
        report["agreement"] = {
            backend: classifier_agreement(model, model.inputs["test_images"], backend)
            for backend in candidate_backends()
        }
    return report


def render(report: dict) -> str:
    """The report as Markdown, for a cascade or for single-exit classifiers."""
    return classifier_markdown(report) if "classifiers" in report else markdown(report)


def evaluate(
    weights: str, baseline: str | None, data: EvaluationSet, out: Path, agreement: bool,
    precisions: tuple[tuple[str, str], ...] = (), precision_images: int | None = None,
) -> tuple[dict, Evaluated]:
    """The report on `data` (see `evaluation_set`), written under `out`, and the scored model.

    precisions: (backend, precision) pairs, e.g. ("mindspore", "fp16"), to hold against PyTorch fp32 (a DVT only), on
    the first `precision_images` test images (all by default)."""
    evaluated = score(weights, data)
    if family_of(evaluated.config).cascade:
        report = _cascade_report(evaluated, weights, baseline, data, agreement, precisions, precision_images)
    elif precisions:
        raise CommandError(f"--precision {precisions[0]} is checked on DVT cascades; "
                           f"{evaluated.config.name} is not one")
    else:
        report = _classifier_report(evaluated, baseline, data, agreement)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "evaluation.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / "evaluation.md", render(report).encode())
    if "classifiers" in report:
        classifier_plot(report["classifiers"], out / "accuracy_vs_gflops.png", data.title)
    else:
        plot(report["dvt"], report.get("baseline"), out / "accuracy_vs_gflops.png", data.title)
    return report, evaluated


def _runs(precision: str) -> str:
    """The first backend that computes at `precision`."""
    return next(name for name, b in backends.BACKENDS.items() if precision in b.precisions)


def _evaluate(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    precisions = (() if args.precision == "fp32"
                  else ((args.precision_backend or _runs(args.precision), args.precision),))
    report, _ = evaluate(
        args.weights, args.baseline, evaluation_set(args), Path(args.out), not args.no_agreement, precisions
    )
    print(render(report))
    print(f"wrote {args.out}/evaluation.md, evaluation.json, accuracy_vs_gflops.png "
          f"in {time.perf_counter() - start:.0f} s")


def add_evaluate(subparsers, common: argparse.ArgumentParser) -> None:
    from .datasets import add_data_arguments

    parser = subparsers.add_parser(
        "evaluate", parents=[common], help="per-exit accuracy and the accuracy-compute curve on any labelled data",
        description="Per-exit accuracy, the release's p sweep and budget targets, the point of the thresholds "
                    "stored with the weights, the static baseline's point, and the other backends' agreement with "
                    "PyTorch; for a VT-ResNet or ResNet, its accuracy, GFLOPs and parameters beside the baseline's; "
                    "written as Markdown, JSON and PNG under --out. Splits: everything is scored on the VAL split of "
                    f"--data (Fashion-MNIST's test set); the sweep's thresholds are found on {CALIBRATION_IMAGES} "
                    "images drawn once from the TRAIN split. Images are read as each model's weights say (their "
                    "data config: class names, size, normalisation).",
    )
    parser.add_argument("--weights", required=True, help="DVT, VT-ResNet or ResNet weights (.safetensors, .pth, .ckpt)")
    parser.add_argument("--baseline",
                        help="baseline weights (the DVT's static baseline, or any classifier), for comparison")
    add_data_arguments(parser)
    parser.add_argument("--out", default="out", help="report folder (default out/)")
    parser.add_argument("--no-agreement", "--no-mindspore", dest="no_agreement", action="store_true",
                        help="skip the other backends' agreement check")
    parser.add_argument("--precision", choices=backends.PRECISIONS, default="fp32",
                        help="also score at this precision and report accuracy and agreement with fp32 "
                             "(default fp32: nothing extra)")
    parser.add_argument("--precision-backend", choices=tuple(backends.BACKENDS), default=None,
                        help="the backend that computes at --precision (default: the first that does, in the order "
                             f"{', '.join(backends.BACKENDS)}); MindSpore's fp16 computes as Ascend's Cube unit does")
    parser.set_defaults(handler=_evaluate)
