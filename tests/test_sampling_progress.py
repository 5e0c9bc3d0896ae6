"""The sampling job's progress: one bar over all of its points on a terminal, an ETA for the point lines elsewhere."""
from __future__ import annotations

import io
from types import SimpleNamespace

import torch

from edm_lab.evaluate.progress import SamplingProgress


def test_one_bar_counts_the_planned_evaluations_of_every_phase():
    out = io.StringIO()
    progress = SamplingProgress(bar=True, file=out)
    progress.plan(64 * (3 + 7))  # two points of 64 samples: Heun at 2 and 4 steps
    progress.plan(64 * 63)  # then a reference solution, planned when it starts
    trainer = SimpleNamespace(world_size=2)
    progress.begin("reference solution (32 Heun steps)", 63)
    progress.on_predict_batch_end(trainer, None, None, torch.arange(16), 0)  # 2 ranks x 16 seeds x 63
    assert progress.done == progress.bar.n == 2 * 16 * 63
    progress.begin("point 1/2 (steps=2)", 3)
    progress.on_predict_batch_end(trainer, None, None, torch.arange(32), 0)
    assert progress.done == 2 * 16 * 63 + 2 * 32 * 3 and progress.bar.total == 64 * 73
    assert progress.eta().startswith(f"{100 * progress.done / (64 * 73):.0f}%, ETA ")
    progress.close()
    text = out.getvalue()
    assert "reference solution (32 Heun steps)" in text and "point 1/2 (steps=2)" in text
    assert "sampling: 100%" in text and text.rstrip().endswith("done")


def test_without_a_terminal_there_is_no_bar_only_an_eta():
    out = io.StringIO()  # not a terminal
    progress = SamplingProgress(file=out)
    assert not progress.draw and progress.eta() == ""
    progress.plan(100)
    progress.begin("point 1/1 (steps=2)", 2)
    progress.on_predict_batch_end(SimpleNamespace(world_size=1), None, None, torch.arange(25), 0)
    progress.close()
    assert out.getvalue() == "" and progress.eta().startswith("50%, ETA 0:")


def test_closing_lines_name_a_sweep_s_csv_logs_by_their_folder(tmp_path):
    """One line, whatever the number of jobs: a long sweep's CSV folders are not listed one by one."""
    import json

    from omegaconf import OmegaConf

    from edm_lab.tasks.hydra_support import closing_lines
    from edm_lab.track.tracking import TRACKER_RECORD

    def jobs(n):
        for i in range(n):
            (tmp_path / str(n) / str(i)).mkdir(parents=True)
            location = str(tmp_path / str(n) / str(i) / "csv" / "version_0")
            (tmp_path / str(n) / str(i) / TRACKER_RECORD).write_text(
                json.dumps({"computed": 1, "kind": "csv", "location": location}))
        return tmp_path / str(n)

    config = OmegaConf.create({"paths": {"results_dir": str(tmp_path / "results")}})
    few = closing_lines(config, jobs(2), None)
    assert few == [f"CSV logs: {tmp_path / '2' / '0' / 'csv' / 'version_0'}, {tmp_path / '2' / '1' / 'csv' / 'version_0'}"]
    many = closing_lines(config, jobs(40), tmp_path / "report.md")
    assert many == [f"CSV logs: 40 runs, <job>/csv/version_0 under {tmp_path / '40'}", f"report: {tmp_path / 'report.md'}"]
