"""Running a command from a test: one place for the subprocess boilerplate."""

import os
import subprocess


def run_ok(args, *, timeout, **kwargs) -> subprocess.CompletedProcess:
  """Runs ``args`` to completion, capturing text; fails the test if it fails.

  The failure message is the tail of the command's stdout and stderr.
  Keyword arguments (``env``, ``cwd``) go to :func:`subprocess.run`.
  """
  done = subprocess.run(
    args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done


def cpu_devices_env(count: int) -> dict[str, str]:
  """The environment for a child process whose JAX sees ``count`` CPU devices.

  JAX reads these flags once, when it starts, so tests that need several
  devices run in a subprocess. The child keeps the fast-compile flags that
  ``conftest.py`` puts in this process's environment.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
    [env.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={count}"]
  ).strip()
  return env
