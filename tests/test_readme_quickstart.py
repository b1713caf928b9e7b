"""The README's quickstart (also the docs' first example) runs and trains."""

import contextlib
import io
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_source() -> str:
  text = README.read_text()
  section = text.split("[start:quickstart]", 1)[1].split("[end:quickstart]", 1)[0]
  (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
  return code


def test_readme_quickstart_trains_the_model():
  namespace: dict = {}
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(quickstart_source(), str(README), "exec"), namespace)
  before, after = (
    float(x) for x in re.findall(r"loss \w+:\s+(\S+)", printed.getvalue())
  )
  # The loss recomputed in float64 numpy from the trained parameters, as the
  # mean over the 256 points of the squared error.
  p = {k: np.asarray(v, np.float64) for k, v in namespace["params"].items()}
  x = np.linspace(-1.0, 1.0, 256)[:, None]
  prediction = np.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  reference = float(np.mean((prediction - np.sin(3.0 * x)) ** 2))
  assert before > 0.1
  assert after < 1e-4 * before
  np.testing.assert_allclose(after, reference, rtol=1e-2, atol=1e-7)
