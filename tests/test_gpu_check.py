"""scripts/gpu_check.py: the CPU smoke run end to end, and that its checks can fail.

The GPU paths cannot run here; these tests keep the script's CPU mode (the same checks
scaled down) from rotting and show that a wrong kernel makes the right checks FAIL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chunkflow.gpu_check.harness import FAIL, PASS, SKIP, Check, Result, Skip, run_checks
from chunkflow.gpu_check.multi_gpu import error_line, parse_max_rel_grad_diff

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _table(stdout: str) -> dict[str, str]:
    """check name -> status, from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in (PASS, FAIL, SKIP):
            rows[parts[1]] = parts[0]
    return rows


@pytest.mark.megatron
@pytest.mark.once
@pytest.mark.slow
def test_cpu_smoke_passes_and_reports(tmp_path):
    out = tmp_path / "x.json"
    proc = _run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = _table(proc.stdout)
    expect_pass = ["env", "init", "attention[fp64]", "attention[fp32]", "verify[fp64]", "verify[fp32]",
                   "verify[fp32,offload-kv]", "train[chunkflow]", "train[resume]", "train[megatron]"]
    expect_skip = ["attention[bf16]", "attention[fp16]", "verify[bf16]", "multi_gpu[verify", "multi_gpu[train"]
    for name in expect_pass:
        assert table.get(name) == PASS, (name, proc.stdout)
    assert "10 passed, 0 failed" in proc.stdout

    report = json.loads(out.read_text())
    assert report["ok"] is True and report["mode"] == "cpu-smoke"
    checks = {c["name"]: c for c in report["checks"]}
    for prefix in expect_skip:
        skipped = [c for n, c in checks.items() if n.startswith(prefix)]
        assert skipped and all(c["status"] == SKIP and c["reason"] == "no CUDA device" for c in skipped), prefix
    # The numbers behind the PASS lines, not just the verdicts.
    att = checks["attention[fp64]"]["details"]
    assert set(att["errors"]) == {"prefix_gqa", "causal_mha", "packed_varlen", "packed_padding", "sbhd_batch2"}
    assert att["worst"] <= 1e-10 and checks["attention[fp32]"]["details"]["worst"] <= 1e-5
    assert checks["verify[fp64]"]["details"]["max_rel_grad_diff"] <= 1e-10
    assert checks["verify[fp32]"]["details"]["num_dependent_chunks"] > 0
    train = checks["train[chunkflow]"]["details"]
    assert train["steps"] == [1, 2, 3, 4] and train["tokens_per_s_per_gpu"] > 0
    assert checks["train[resume]"]["details"]["steps"] == [3, 4]
    assert checks["train[resume]"]["details"]["max_rel_loss_diff"] <= 1e-6
    assert checks["train[megatron]"]["details"]["max_rel_loss_diff_vs_chunkflow"] <= 1e-4
    assert report["environment"]["torch"] == torch.__version__


# A wrong kernel: torch's top-left aligned causal mask, the bug docs/chunkflow.md warns about.
# Correct when sq == sk (packed rows), wrong for a dependent chunk over its prefix.
WRONG_KERNEL = '''
import sys, torch, torch.nn.functional as F
import chunkflow.model.attention as attention, chunkflow.scheduling.state as state

def top_left(q, k, v, scale, prefix=(), on_prefix=None):
    k = torch.cat([pk for pk, _ in prefix] + [k], dim=1)
    v = torch.cat([pv for _, pv in prefix] + [v], dim=1)
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale)[0]

attention.causal_attention = state.causal_attention = top_left

# The same mistake in the block path the CPU executor runs (chunkflow.scheduling.state):
# a prefix block masked causally as if it were the chunk's own diagonal block.
_block_forward = attention.block_forward

def prefix_masked(q, k, v, scale, causal):
    return _block_forward(q, k, v, scale, True)

attention.block_forward = state.block_forward = prefix_masked
from chunkflow.gpu_check.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.megatron
@pytest.mark.once
@pytest.mark.slow
def test_a_wrong_attention_mask_fails_the_right_checks(tmp_path):
    wrapper = tmp_path / "wrong_kernel.py"
    wrapper.write_text(WRONG_KERNEL)
    out = tmp_path / "x.json"
    proc = _run([sys.executable, str(wrapper), "--cpu-smoke", "--out", str(out),
                 "--only", "init,attention[fp32],verify[fp32]"])
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = _table(proc.stdout)
    assert table == {"init": PASS, "attention[fp32]": FAIL, "verify[fp32]": FAIL}, proc.stdout
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    reason = checks["attention[fp32]"]["reason"]
    assert "prefix_gqa" in reason and "packed" not in reason, reason  # only the prefix case is wrong
    assert checks["attention[fp32]"]["details"]["errors"]["prefix_gqa"]["out"] > 1e-2
    assert "gradients differ" in checks["verify[fp32]"]["reason"]
    assert json.loads(out.read_text())["ok"] is False


def test_checks_are_isolated_and_oom_is_named():
    def boom():
        raise RuntimeError("first line\nsecond line: the one shown")

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def skip():
        raise Skip("needs 2 CUDA devices, found 1")

    results = run_checks([
        Check("a", boom), Check("b", oom), Check("c", lambda: Result("", PASS, value="42")),
        Check("d", lambda: Result("", PASS), needs=("a",)), Check("e", skip),
    ])
    by = {r.name: r for r in results}
    assert by["a"].status == FAIL and by["a"].reason == "RuntimeError: second line: the one shown"
    assert by["b"].status == FAIL and by["b"].reason.startswith("out of memory: ") and "20.00 GiB" in by["b"].reason
    assert by["c"].status == PASS and by["c"].value == "42"
    assert by["d"].status == SKIP and "needs a" in by["d"].reason
    assert by["e"].status == SKIP and by["e"].reason == "needs 2 CUDA devices, found 1"


def test_torchrun_output_is_reduced_to_its_telling_line():
    out = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File x\n"
           "[rank1]: ValueError: parallel.tensor=2 does not divide 3\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n====\n")
    assert error_line(out) == "[rank1]: ValueError: parallel.tensor=2 does not divide 3"
    assert error_line("a\ntorch.OutOfMemoryError: CUDA out of memory. Tried\nb").startswith("out of memory:")
    assert parse_max_rel_grad_diff("loss ...\nmax_rel_grad_diff=2.2e-07\n") == pytest.approx(2.2e-7)
    assert parse_max_rel_grad_diff("crashed") is None
