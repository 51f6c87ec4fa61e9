"""The "your own images, end to end" chain of `dvt` on image folders made from data sets that PyPI packages ship.

Builds two class-per-folder image trees (`ROOT/NAME/train/CLASS/*.png`, `ROOT/NAME/val/CLASS/*.png`) from
data that installed packages carry inside themselves, so nothing is downloaded at run time:

- grey: scikit-learn's `load_digits()` (1797 8x8 digits, 0..16), scaled to 0..255 and upscaled bilinearly to
  28x28 8-bit grey PNGs, in folders named after the digit words ("zero" ... "nine"); a seeded split,
  stratified by class, of 1300 train images and the rest (497) for val.
- rgb: six photos shipped inside scikit-image (`skimage.data`), one class each, named after the photo; seeded
  random 96x96 crops resized to 32x32 RGB PNGs, 260 per class for train and 60 per class for val. Val crops come
  from a strip at the right of each photo that train crops never touch, so no val pixel is seen in training.

Then, for each folder, it runs the chain a user runs on their own images, each step a `dvt` subprocess:

1. `dvt train` twice at equal epochs: fine-tuned from the shipped Fashion-MNIST DVT (`--init-weights`) and from
   scratch (`--model dvt_t2t_vit_fmnist`); the rgb folder adds `--input-size 3 32 32`. Reads the final exit's
   val accuracy per epoch from each run's log.jsonl.
2. `dvt calibrate --data FOLDER` on the fine-tuned weights (default target), thresholds stored in the file.
3. `dvt evaluate --data FOLDER`: per-exit accuracy and GFLOPs on val, and the stored thresholds' point there.
4. `dvt predict FOLDER/val --out pred.parquet`: accuracy as the share of rows whose label is the image's parent
   folder name, checked against evaluate's calibrated accuracy (and its MFLOPs against evaluate's).
5. `dvt serve --stop-after K` in the background: K val PNGs POSTed to /v1/predict; the answered labels must
   be the folder's class names and equal predict's labels for the same files. The server stops by itself after
   the K-th request; it is killed after a timeout in any case.

Prints a Markdown table per folder and writes benchmarks/results/own_folder.json and own_folder.png (accuracy
against MFLOPs per image: the per-exit curve and the calibrated point of each fine-tuned model). MFLOPs here are
the project's FLOPs count (multiply-accumulates, as the DVT paper counts them).

Needs scikit-learn and scikit-image in the environment (the `bench` extra):
    .venv/bin/pip install -e '.[bench]'

    .venv/bin/python benchmarks/own_folder.py                     # build both folders and run the whole chain
    .venv/bin/python benchmarks/own_folder.py --build-only        # only write the image folders
    .venv/bin/python benchmarks/own_folder.py --skip-rgb --epochs 2
    .venv/bin/python benchmarks/own_folder.py --report-only       # reprint table and plot from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHIPPED = REPO / "weights" / "dvt_t2t_vit_fmnist.safetensors"
SCRATCH_MODEL = "dvt_t2t_vit_fmnist"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GREY_TRAIN = 1300
GREY_SIZE = 28

# RGB photos of skimage.data that ship in the wheel (no pooch download); `cat` is `chelsea` again.
RGB_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
RGB_CROP = 96
RGB_SIZE = 32
RGB_TRAIN_PER_CLASS = 260
RGB_VAL_PER_CLASS = 60
RGB_VAL_STRIP = 0.3  # val crops come from the rightmost 30% of each photo's width, train crops from the rest

SERVE_START_TIMEOUT = 180.0
SERVE_STOP_TIMEOUT = 90.0


# ---------------------------------------------------------------------------------------------------------------
# the image folders


def _fresh(folder: Path) -> None:
    # a rebuild replaces this script's own earlier folder (a changed seed or split must not leave stale files)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def build_grey(folder: Path, seed: int) -> dict:
    """scikit-learn's digits as 28x28 grey PNGs, a stratified seeded split of GREY_TRAIN train images."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images, digits.target
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), train_size=GREY_TRAIN, stratify=labels, random_state=seed
    )
    _fresh(folder)
    pixels = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in sorted(indices):
            out = folder / split / DIGIT_WORDS[labels[i]]
            out.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[i], mode="L").resize((GREY_SIZE, GREY_SIZE), Image.BILINEAR)
            image.save(out / f"{i}.png")
    return folder_summary(folder)


def load_photo(name: str) -> np.ndarray:
    """One skimage.data photo as HxWx3 uint8; an image that would need a download fails here, not half-way."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}() is {image.shape} {image.dtype}, not an 8-bit RGB photo")
    return image[:, :, :3]


def _crops(photo: np.ndarray, x_lo: int, x_hi: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` random RGB_CROP squares of `photo` lying entirely within columns [x_lo, x_hi)."""
    height = photo.shape[0]
    if x_hi - x_lo < RGB_CROP or height < RGB_CROP:
        raise ValueError(f"a {photo.shape} photo has no {RGB_CROP}x{RGB_CROP} crop in columns {x_lo}..{x_hi}")
    ys = rng.integers(0, height - RGB_CROP + 1, size=count)
    xs = rng.integers(x_lo, x_hi - RGB_CROP + 1, size=count)
    return [photo[y:y + RGB_CROP, x:x + RGB_CROP] for y, x in zip(ys, xs)]


def build_rgb(folder: Path, seed: int, photos: tuple[str, ...] = RGB_PHOTOS) -> dict:
    """Random crops of skimage's photos as 32x32 RGB PNGs, one class per photo, val from a held-out strip."""
    from PIL import Image

    _fresh(folder)
    rng = np.random.default_rng(seed)
    for name in photos:
        photo = load_photo(name)
        split_x = int(round(photo.shape[1] * (1.0 - RGB_VAL_STRIP)))
        for split, (x_lo, x_hi), count in (("train", (0, split_x), RGB_TRAIN_PER_CLASS),
                                           ("val", (split_x, photo.shape[1]), RGB_VAL_PER_CLASS)):
            out = folder / split / name
            out.mkdir(parents=True, exist_ok=True)
            for n, crop in enumerate(_crops(photo, x_lo, x_hi, count, rng)):
                Image.fromarray(crop, mode="RGB").resize((RGB_SIZE, RGB_SIZE), Image.BILINEAR).save(out / f"{n}.png")
    return folder_summary(folder)


def folder_summary(folder: Path) -> dict:
    """Images per split and class, the first image's mode and size, and the size on disk."""
    from PIL import Image

    summary: dict = {"path": str(folder), "bytes": 0}
    for split in ("train", "val"):
        counts = {c.name: sum(1 for _ in c.glob("*.png")) for c in sorted((folder / split).iterdir()) if c.is_dir()}
        summary[split] = {"images": sum(counts.values()), "per_class": counts}
    summary["bytes"] = sum(p.stat().st_size for p in folder.rglob("*.png"))
    with Image.open(next(folder.rglob("*.png"))) as image:
        summary["image"] = {"mode": image.mode, "size": list(image.size)}
    return summary


# ---------------------------------------------------------------------------------------------------------------
# the dvt chain


def dvt_command() -> list[str]:
    """The `dvt` script beside this interpreter, or `python -m dvt_cli`."""
    script = Path(sys.executable).with_name("dvt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dvt_cli"]


def run_dvt(args: list[str], log: Path, label: str) -> tuple[str, float]:
    """Run `dvt ARGS`, its stdout and stderr into `log`; returns its stdout and wall seconds, raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*dvt_command(), *args]
    print(f"  {label}: dvt {' '.join(args)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    seconds = time.perf_counter() - started
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip())[-3000:]
        raise RuntimeError(f"{label} failed (exit {done.returncode}, log {log}):\n{tail}")
    print(f"    {seconds:.1f} s", flush=True)
    return done.stdout, seconds


def final_exit_curve(out: Path) -> list[float]:
    """The final exit's val accuracy (%) after each epoch, from a training run's log.jsonl."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["test_acc"][-1]) for r in records if "test_acc" in r]


CALIBRATE_LINE = re.compile(
    r"thresholds \[(?P<thresholds>[^\]]*)\] on (?P<images>\d+) (?P<split>\w+) images: accuracy (?P<acc>[\d.]+)%, "
    r"(?P<gflops>[\d.]+) GFLOPs on average, exits \[(?P<exits>[^\]]*)\]"
)


def parse_calibrate(stdout: str) -> dict:
    """The calibration point `dvt calibrate` prints (on its calibration images, not val)."""
    match = CALIBRATE_LINE.search(stdout)
    if match is None:
        return {"line": stdout.strip().splitlines()[-1] if stdout.strip() else ""}
    counts = [int(c) for c in match["exits"].split(",") if c.strip()]
    return {
        "thresholds": [float(t) for t in match["thresholds"].split(",") if t.strip()],
        "images": int(match["images"]), "split": match["split"], "accuracy": float(match["acc"]),
        "mflops": float(match["gflops"]) * 1e3, "exit_shares": [c / max(sum(counts), 1) for c in counts],
    }


def check_predict(parquet: Path, evaluation: dict, class_names: list[str]) -> dict:
    """predict's accuracy (label == parent folder) and MFLOPs against evaluate's calibrated point on val."""
    import pandas as pd

    rows = pd.read_parquet(parquet)
    truth = rows["path"].map(lambda p: Path(p).parent.name)
    correct = rows["label"] == truth
    n = len(rows)
    calibrated = evaluation.get("calibrated") or {}
    eval_acc = calibrated.get("accuracy")
    exits = rows["exit"].to_numpy()
    num_exits = len(evaluation.get("dvt", {}).get("exit_accuracy", [])) or int(exits.max()) + 1
    result = {
        "images": n,
        "accuracy": 100.0 * float(correct.mean()),
        "mflops": float(rows["macs"].mean()) / 1e6,
        "exit_shares": (np.bincount(exits, minlength=num_exits) / max(n, 1)).tolist(),
        "labels_are_class_names": bool(rows["label"].isin(class_names).all()),
        "evaluate_accuracy": eval_acc,
        "evaluate_mflops": calibrated["gflops"] * 1e3 if "gflops" in calibrated else None,
    }
    # evaluate reports the share only, so this counts images between the two correct-totals
    result["disagreeing_images"] = (
        abs(int(correct.sum()) - int(round(eval_acc / 100.0 * n))) if eval_acc is not None else None
    )
    result["labels"] = dict(zip((str(Path(p).resolve()) for p in rows["path"]), rows["label"]))
    return result


def _post_png(url: str, path: Path, timeout: float = 60.0) -> dict:
    request = urllib.request.Request(url, data=path.read_bytes(), headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (this script started it in a session of its own), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def check_serve(weights: Path, val: Path, port: int, requests: int, predicted: dict, log: Path, seed: int) -> dict:
    """`dvt serve --stop-after K`, K val PNGs POSTed (round robin over classes); labels against predict's."""
    classes = sorted(c for c in val.iterdir() if c.is_dir())
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(sorted(c.glob("*.png")))) for c in classes]
    picks = [pools[k % len(pools)][k // len(pools)] for k in range(requests)]
    args = ["serve", "--weights", str(weights), "--port", str(port), "--stop-after", str(requests)]
    print(f"  serve: dvt {' '.join(args)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as err:
        process = subprocess.Popen([*dvt_command(), *args], stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                                   start_new_session=True)
        lines: list[str] = []
        serving = threading.Event()

        def read_stdout() -> None:
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("serving"):
                    serving.set()

        reader = threading.Thread(target=read_stdout, daemon=True)
        reader.start()
        answers: list[dict] = []
        try:
            deadline = time.monotonic() + SERVE_START_TIMEOUT
            while not serving.wait(0.5):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dvt serve did not start (exit {process.poll()}; stderr in {log}):\n"
                                       + "\n".join(lines[-20:]))
            startup = time.perf_counter() - started
            url = f"http://127.0.0.1:{port}/v1/predict"
            for path in picks:
                answer = _post_png(url, path)
                answers.append({"path": str(path.relative_to(val)), "truth": path.parent.name,
                                "label": answer.get("label"), "exit": answer.get("exit"),
                                "confidence": answer.get("confidence"), "macs": answer.get("macs"),
                                "predict_label": predicted.get(str(path.resolve()))})
            try:
                process.wait(timeout=SERVE_STOP_TIMEOUT)
                stopped_by_itself = True
            except subprocess.TimeoutExpired:
                stopped_by_itself = False
        finally:
            _stop(process)
            reader.join(timeout=5)
    names = {c.name for c in classes}
    return {
        "requests": len(answers), "startup_seconds": round(startup, 1),
        "labels_are_class_names": all(a["label"] in names for a in answers),
        "matches_predict": sum(a["label"] == a["predict_label"] for a in answers),
        "correct": sum(a["label"] == a["truth"] for a in answers),
        "stopped_by_itself": stopped_by_itself, "exit_code": process.returncode, "answers": answers,
        "stdout": lines,
    }


def run_chain(name: str, folder: Path, out: Path, epochs: int, extra: list[str], port: int, requests: int,
              seed: int) -> dict:
    """Train (fine-tuned and from scratch), calibrate, evaluate, predict and serve on one image folder."""
    shutil.rmtree(out, ignore_errors=True)  # a rerun replaces this script's own earlier run
    logs = out / "logs"
    result: dict = {"folder": folder_summary(folder), "epochs": epochs, "seconds": {}}
    common = ["--data", str(folder), "--epochs", str(epochs), "--no-progress", *extra]
    _, result["seconds"]["train_finetune"] = run_dvt(
        ["train", *common, "--init-weights", str(SHIPPED), "--out", str(out / "ft")], logs / "train_ft.log",
        f"[{name}] fine-tune")
    _, result["seconds"]["train_scratch"] = run_dvt(
        ["train", *common, "--model", SCRATCH_MODEL, "--out", str(out / "scratch")], logs / "train_scratch.log",
        f"[{name}] from scratch")
    result["finetune_curve"] = final_exit_curve(out / "ft")
    result["scratch_curve"] = final_exit_curve(out / "scratch")

    weights = out / "ft" / "best.safetensors"
    stdout, result["seconds"]["calibrate"] = run_dvt(
        ["calibrate", "--weights", str(weights), "--data", str(folder)], logs / "calibrate.log", f"[{name}] calibrate")
    result["calibrate"] = parse_calibrate(stdout)

    _, result["seconds"]["evaluate"] = run_dvt(
        ["evaluate", "--weights", str(weights), "--data", str(folder), "--out", str(out / "eval"), "--no-agreement"],
        logs / "evaluate.log", f"[{name}] evaluate")
    evaluation = json.loads((out / "eval" / "evaluation.json").read_text())
    dvt = evaluation.get("dvt", {})
    calibrated = evaluation.get("calibrated", {})
    result["evaluate"] = {
        "exit_accuracy": dvt.get("exit_accuracy"),
        "exit_mflops": [g * 1e3 for g in dvt.get("exit_gflops", [])],
        "calibrated": {"accuracy": calibrated.get("accuracy"),
                       "mflops": calibrated["gflops"] * 1e3 if "gflops" in calibrated else None,
                       "exit_shares": calibrated.get("exit_shares")},
    }

    parquet = out / "pred.parquet"
    _, result["seconds"]["predict"] = run_dvt(
        ["predict", str(folder / "val"), "--weights", str(weights), "--out", str(parquet)], logs / "predict.log",
        f"[{name}] predict")
    class_names = sorted(result["folder"]["val"]["per_class"])
    predict = check_predict(parquet, evaluation, class_names)
    predicted = predict.pop("labels")
    result["predict"] = predict

    result["serve"] = check_serve(weights, folder / "val", port, requests, predicted, logs / "serve.log", seed)
    return result


# ---------------------------------------------------------------------------------------------------------------
# the report


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _shares(values) -> str:
    return "-" if not values else " / ".join(f"{100 * v:.0f}" for v in values)


def markdown(results: dict) -> str:
    """The Markdown report of a results dict (as written to own_folder.json)."""
    lines = [f"## Your own images, end to end ({results.get('epochs', '?')} epochs)", ""]
    header = ("folder", "classes", "train / val", "fine-tuned %", "from scratch %", "calibrated % (val)",
              "MFLOPs / image", "full model MFLOPs", "exit shares %", "predict %", "evaluate %", "disagreeing",
              "serve labels")
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, r in results["folders"].items():
        folder, ev, pred, serve = r["folder"], r["evaluate"], r["predict"], r["serve"]
        calibrated = ev["calibrated"]
        serve_cell = (f"{serve['matches_predict']}/{serve['requests']} = predict, "
                      f"{'class names' if serve['labels_are_class_names'] else 'NOT class names'}")
        lines.append("| " + " | ".join([
            name, str(len(folder["val"]["per_class"])), f"{folder['train']['images']} / {folder['val']['images']}",
            _pct(r["finetune_curve"][-1] if r["finetune_curve"] else None),
            _pct(r["scratch_curve"][-1] if r["scratch_curve"] else None),
            _pct(calibrated["accuracy"]), _pct(calibrated["mflops"]),
            _pct(ev["exit_mflops"][-1] if ev["exit_mflops"] else None), _shares(calibrated["exit_shares"]),
            _pct(pred["accuracy"]), _pct(pred["evaluate_accuracy"]), str(pred["disagreeing_images"]), serve_cell,
        ]) + " |")
    lines += ["", "Final exit's val accuracy (%) per epoch:", "",
              "| folder | run | " + " | ".join(f"epoch {e + 1}" for e in range(results.get("epochs", 0))) + " |",
              "|---|---|" + "---|" * results.get("epochs", 0)]
    for name, r in results["folders"].items():
        for run, curve in (("fine-tuned", r["finetune_curve"]), ("from scratch", r["scratch_curve"])):
            lines.append(f"| {name} | {run} | " + " | ".join(_pct(a) for a in curve) + " |")
    lines += ["", "Calibration (on train images) and per-exit val accuracy:", ""]
    for name, r in results["folders"].items():
        cal = r["calibrate"]
        point = (f"{_pct(cal.get('accuracy'))}% at {_pct(cal.get('mflops'))} MFLOPs on {cal.get('images')} "
                 f"{cal.get('split')} images, exit shares {_shares(cal.get('exit_shares'))} %"
                 if "accuracy" in cal else cal.get("line", "-"))
        exits = ", ".join(f"{a:.2f}% @ {m:.2f}" for a, m in zip(r["evaluate"]["exit_accuracy"] or [],
                                                                 r["evaluate"]["exit_mflops"]))
        pred = r["predict"]
        lines.append(f"- {name}: calibrate {point}; exits {exits} MFLOPs; predict {_pct(pred['mflops'])} MFLOPs, "
                     f"exit shares {_shares(pred['exit_shares'])} % (evaluate {_pct(pred['evaluate_mflops'])})")
    lines += ["", "Serve answers (a sample):", ""]
    for name, r in results["folders"].items():
        serve = r["serve"]
        sample = ", ".join(f"{a['path']} -> {a['label']}" for a in serve["answers"][:6])
        lines.append(f"- {name}: {serve['correct']}/{serve['requests']} correct, started in "
                     f"{serve['startup_seconds']} s, stopped by itself: {serve['stopped_by_itself']}; {sample}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Accuracy against MFLOPs per image: each folder's per-exit curve and its calibrated point on val."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = results["folders"]
    fig, axes = plt.subplots(1, len(folders), figsize=(5.5 * len(folders), 4.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], folders.items()):
        ev = r["evaluate"]
        if ev["exit_accuracy"]:
            ax.plot(ev["exit_mflops"], ev["exit_accuracy"], "s--", color="tab:gray", label="every image at exit k")
        calibrated = ev["calibrated"]
        if calibrated["accuracy"] is not None and calibrated["mflops"] is not None:
            ax.plot([calibrated["mflops"]], [calibrated["accuracy"]], "o", color="tab:red", markersize=9,
                    label="calibrated early exit (evaluate)")
        pred = r["predict"]
        ax.plot([pred["mflops"]], [pred["accuracy"]], "x", color="tab:blue", markersize=10,
                label="dvt predict on val/")
        cal = r["calibrate"]
        if "accuracy" in cal:
            ax.plot([cal["mflops"]], [cal["accuracy"]], "o", mfc="none", color="tab:red", markersize=9,
                    label=f"dvt calibrate ({cal['images']} {cal['split']} images)")
        ax.set_title(f"{name}: {len(r['folder']['val']['per_class'])} classes, "
                     f"{r['folder']['val']['images']} val images")
        ax.set_xlabel("MFLOPs per image")
        ax.set_ylabel("val accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"Fine-tuned DVT on image folders ({results.get('epochs', '?')} epochs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, json_path: Path) -> None:
    print(markdown(results))
    plot(results, json_path.with_suffix(".png"))
    print(f"\nplot: {json_path.with_suffix('.png')}")


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "out" / "own_folder" / "images",
                        help="where the image folders are written (ROOT/grey, ROOT/rgb)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "own_folder" / "runs",
                        help="where the runs' weights, logs and reports go (OUT/grey, OUT/rgb)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs, fine-tuned and from scratch")
    parser.add_argument("--skip-rgb", action="store_true", help="only the grey (digits) folder")
    parser.add_argument("--build-only", action="store_true", help="write the image folders and stop")
    parser.add_argument("--report-only", action="store_true",
                        help="reprint the table and redraw the plot from --results, run nothing")
    parser.add_argument("--port", type=int, default=8765, help="HTTP port of `dvt serve` (127.0.0.1)")
    parser.add_argument("--requests", type=int, default=12, help="val images POSTed to `dvt serve` per folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, crops and served images")
    parser.add_argument("--results", type=Path, default=RESULTS / "own_folder.json",
                        help="results JSON (the plot goes beside it as .png)")
    args = parser.parse_args()

    if args.report_only:
        report(json.loads(args.results.read_text()), args.results)
        return

    builders = {"grey": (build_grey, [])}
    if not args.skip_rgb:
        builders["rgb"] = (build_rgb, ["--input-size", "3", str(RGB_SIZE), str(RGB_SIZE)])
    folders = {}
    for name, (build, _) in builders.items():
        started = time.perf_counter()
        summary = build(args.root / name, args.seed)
        folders[name] = summary
        print(f"{name}: {summary['train']['images']} train / {summary['val']['images']} val images in "
              f"{len(summary['val']['per_class'])} classes ({', '.join(summary['val']['per_class'])}), "
              f"{summary['image']['mode']} {summary['image']['size'][0]}x{summary['image']['size'][1]}, "
              f"{summary['bytes'] / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s", flush=True)
    if args.build_only:
        return

    results = {"epochs": args.epochs, "seed": args.seed, "folders": {}}
    for name, (_, extra) in builders.items():
        print(f"\n{name}:", flush=True)
        results["folders"][name] = run_chain(name, args.root / name, args.out / name, args.epochs, extra, args.port,
                                             args.requests, args.seed)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")  # after each folder: a later failure keeps it
    print()
    report(results, args.results)


if __name__ == "__main__":
    main()
