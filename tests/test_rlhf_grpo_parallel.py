"""The GRPO gradient on Megatron-Core at TP2 + SP and PP2 (2 gloo ranks) with fixed completions, against
transformers' autograd of the GRPO surrogate written from the papers (tests/parallel/grpo_grad_worker.py):
every weight's gradient (exported to HF names by the converters) and the loss value, for grpo with a
KL term to a perturbed reference, sequence-level bnpo, dapo (global token mean) and grpo on the
high-entropy half of the tokens (--top_entropy_quantile 0.5); the logged entropy."""

from __future__ import annotations

import glob
import json

import pytest
import torch

from helpers import TESTS, python_script, torchrun

WORKER = TESTS / "parallel" / "grpo_grad_worker.py"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_oracle")
    python_script(WORKER, ["--oracle", "--root", root], timeout=240)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tp", "2", "--sp"], ["--pp", "2"]], ids=["tp2_sp", "pp2"])
def test_grpo_gradient_equals_transformers_autograd(oracle, layout, tmp_path):
    from safetensors.torch import load_file

    torchrun(WORKER, 2, ["--root", oracle, "--out", tmp_path, *layout], timeout=300)
    want = torch.load(oracle / "oracle.pt")
    result = json.load(open(tmp_path / "result.json"))
    for case, expected in want.items():
        assert result[case]["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-7), case
        grads = {}
        for path in glob.glob(str(tmp_path / case / "*.safetensors")):
            grads.update(load_file(path))
        assert set(grads) == set(expected["grads"])
        for name, g in expected["grads"].items():
            assert g.abs().max() > 0, (case, name)  # every weight gets a gradient: the check can fail
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()),
                                       msg=lambda m: f"{case} {name}: {m}")
        if "beta" in case:
            assert result[case]["metrics"]["kl"] > 0  # the reference differs from the policy
        # the vocab-parallel entropy (three all-reduces) against transformers' softmax at T
        assert result[case]["metrics"]["entropy/mean"] == pytest.approx(expected["entropy"], rel=1e-5)
        if case == "grpo_top_entropy":
            assert result[case]["metrics"]["entropy/kept_fraction"] == pytest.approx(expected["kept"])
            assert 0.3 < expected["kept"] < 0.7
