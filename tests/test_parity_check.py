"""`ddim-jax parity` on a user's weights: the verdict, its exit status, and `--layers` naming the first
module where the twins part (one twin altered at run time)."""

import json

import pytest

from ddim_jax import cli
from ddim_jax.interop import parity, parity_check


def _parity(weights, tmp_path, *extra) -> tuple[int, dict]:
  out = tmp_path / "parity.json"
  code = cli.main(["parity", "--weights", weights, "--steps", "5", "--json", str(out), *extra])
  return code, json.loads(out.read_text())


@pytest.mark.slow
def test_parity_of_a_trained_model_is_within_the_bounds(trained_weights, tmp_path, capsys):
  code, record = _parity(trained_weights("r"), tmp_path, "--layers")
  printed = capsys.readouterr().out
  assert code == 0 and record["passed"], printed
  assert [r["name"] for r in record["rows"]] == ["forward, BN eval", "forward, BN train",
                                                 "trajectory eta=0, every state", "trajectory eta=1, every state"]
  assert all(0 <= r["max_rel"] <= r["bound"] for r in record["rows"])
  names = [r["name"] for r in record["layers"]]
  # Every level and block of the U-Net is compared, the whole network last (torch finishes it last).
  for block in ("down_blocks.0.residual_blocks.0.norm", "down_blocks.1", "mid_blocks.0", "up_blocks.1", "output"):
    assert block in names, names
  assert names[-1] == "output" and record["first_divergence"] is None
  assert "verdict: within the float32 bounds" in printed


@pytest.mark.slow
def test_an_altered_twin_fails_and_the_layers_name_the_altered_block_first(trained_weights, tmp_path, monkeypatch,
                                                                          capsys):
  """A porter's mistake planted in the torch twin (a BatchNorm epsilon of 0.1, not 1e-3, in one block):
  exit 1, and the first module past the bound is that BatchNorm, though every later one differs too."""
  original = parity.torch_twin

  def altered(model, variables):
    twin = original(model, variables)
    twin.down_blocks[1].residual_blocks[0].norm.eps = 0.1
    return twin

  monkeypatch.setattr(parity, "torch_twin", altered)
  code, record = _parity(trained_weights("keras"), tmp_path, "--layers")
  printed = capsys.readouterr().out
  assert code == 1 and not record["passed"]
  assert not next(r for r in record["rows"] if r["name"] == "forward, BN eval")["ok"]
  assert record["first_divergence"] == "down_blocks.1.residual_blocks.0.norm", printed
  layers = {r["name"]: r for r in record["layers"]}
  assert layers["down_blocks.0"]["ok"] and not layers["output"]["ok"]  # before it all agree; after, nothing does
  assert "first module past the bound: down_blocks.1.residual_blocks.0.norm" in printed
  assert "verdict: OUTSIDE the float32 bounds (exit 1)" in printed


@pytest.mark.slow
def test_bf16_parity_holds_its_bounds_and_is_really_bfloat16(trained_weights, tmp_path, capsys):
  """JAX in bfloat16 and torch under autocast(bfloat16), against float32 and each other: within the
  measured bounds, and far from float32 agreement (so bfloat16 did run on both sides). (The r
  variant's numbers, measured the same way, are in docs/parity.md.)"""
  code, record = _parity(trained_weights("keras"), tmp_path, "--precision", "bf16", "--batch-size", "2")
  printed = capsys.readouterr().out
  assert code == 0 and record["passed"] and record["precision"] == "bf16", printed
  bf16 = [r for r in record["rows"] if r["name"].startswith("bf16")]
  assert len(bf16) == 9
  for row in bf16:
    assert 5e-4 < row["max_rel"] <= row["bound"], row  # bfloat16 keeps 8 bits: ~4e-3 per rounding
  assert "verdict: within the float32 and bfloat16 bounds" in printed


def test_rows_judge_the_relative_difference():
  assert parity_check.Row("x", 5.0, 1e-6, 1e-5).ok and not parity_check.Row("x", 1e-9, 2e-5, 1e-5).ok
  check = parity_check.ParityCheck([parity_check.Row("a", 0, 0, 1e-5)], {}, "highest", 16, 5, 4,
                                   layers=[parity_check.Row("l0", 0, 0, 1e-5), parity_check.Row("l1", 1, 1, 1e-5),
                                           parity_check.Row("l2", 1, 1, 1e-5)])
  assert check.passed and check.first_divergence.name == "l1" and check.record()["first_divergence"] == "l1"
