"""The README's main command: the demo runs and writes what it promises."""

import json
import math

import pytest

pytest.importorskip("matplotlib")

from sofo_jax import demo  # pylint: disable=g-import-not-at-top


def test_quick_demo_writes_table_inputs_and_plot(tmp_path, capsys):
  results = demo.main(["--quick", "--out", str(tmp_path)])
  assert set(results) == {"SOFO (K=16)", "Adam + BPTT"}
  saved = json.loads((tmp_path / "results.json").read_text())
  for label, run in saved.items():
    assert len(run["losses"]) == 20 and all(math.isfinite(x) for x in run["losses"]), (
      label
    )
    assert math.isfinite(run["eval"]["loss"]) and 0 <= run["eval"]["accuracy"] <= 1
    assert run["ms_per_step"] > 0
  # SOFO at its defaults: the paper's learning rate, no warm-up, no blow-up.
  sofo = saved["SOFO (K=16)"]
  assert sofo["settings"]["learning_rate"] == 1.0
  assert max(sofo["losses"]) <= 3 * sofo["losses"][0]
  assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = capsys.readouterr().out
  assert "SOFO (K=16)" in table and "Adam + BPTT" in table and "accuracy" in table
