"""`dvt_cli.ship`'s summary of a training run, read from its log."""
import json

import pytest

from dvt_cli import ship
from dvt_cli.ship import run_summary, ship_training_log


def test_run_summary_reads_the_last_epoch_and_the_median_epoch_time(tmp_path):
    epochs = [(1, 548.0, [75.3]), (2, 212.0, [81.1]), (3, 2007.0, [83.7]), (4, 200.0, [85.0])]  # epoch 3: paused
    elapsed, lines = 0.0, []
    for epoch, seconds, acc in epochs:
        elapsed += seconds
        lines.append(json.dumps({"epoch": epoch, "epoch_time_s": seconds, "elapsed_s": elapsed, "test_acc": acc}))
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_summary(tmp_path)
    assert summary == {"epochs": 4, "wall_time_s": 2967.0, "median_epoch_s": 380.0}


def test_ship_training_log_copies_the_log_and_plot_beside_the_weights(tmp_path, monkeypatch):
    run, weights = tmp_path / "run", tmp_path / "weights"
    run.mkdir()
    weights.mkdir()
    monkeypatch.setattr(ship, "WEIGHTS_DIR", weights)
    with pytest.raises(FileNotFoundError, match="no log.jsonl"):
        ship_training_log(run, "m")
    (run / "log.jsonl").write_text('{"epoch": 1}\n')
    (run / "log.png").write_bytes(b"\x89PNG")
    assert ship_training_log(run, "m") == {"training_log": "m.log.jsonl", "training_curve": "m.png"}
    assert (weights / "m.log.jsonl").read_text() == '{"epoch": 1}\n'
    assert (weights / "m.png").read_bytes() == b"\x89PNG"
