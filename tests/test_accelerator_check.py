"""scripts/accelerator_check.py: what it records, and that a failing or hanging step does not stop
it. (The whole check runs end to end on this CPU with ``--small`` in ~7 minutes; that run is not part
of the suite: its steps are the benchmark, parity and demo commands that the suite tests itself.)"""

import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
import accelerator_check  # noqa: E402  pylint: disable=wrong-import-position
sys.path.pop(0)


def test_env_step_writes_the_device_and_versions(tmp_path):
  assert accelerator_check.main(["--steps", "env", "--out", str(tmp_path)]) == 0
  result = json.loads((tmp_path / "accelerator_check.json").read_text())
  env = result["steps"]["env"]
  assert env["backend"] == "cpu" and env["device_count"] >= 1
  assert env["versions"]["jax"] and env["versions"]["flax"]
  assert result["failed_steps"] == []
  assert "done in" in (tmp_path / "accelerator_check.log").read_text()


def test_a_failing_or_hanging_step_is_recorded_and_the_check_goes_on(tmp_path):
  check = accelerator_check.Check(str(tmp_path))
  check.record("hangs", check.run("hangs", [sys.executable, "-c", "import time; time.sleep(30)"], timeout=1))
  check.record("fails", {"a": check.run("fails", [sys.executable, "-c", "raise SystemExit('boom')"], timeout=30),
                         "b": check.run("works", [sys.executable, "-c", "print('ok')"], timeout=30)})
  result = json.loads((tmp_path / "accelerator_check.json").read_text())  # written after every step
  assert result["steps"]["hangs"]["returncode"] == "timeout"
  assert "boom" in result["steps"]["fails"]["a"]["output_tail"]
  assert accelerator_check.failed_steps(result["steps"]) == ["hangs", "fails/a"]


def test_unknown_steps_are_refused():
  with pytest.raises(SystemExit):
    accelerator_check.parse_args(["--steps", "env,warp"])
