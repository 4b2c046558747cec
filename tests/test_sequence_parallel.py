"""Sequence parallelism (issue 12): TP=2 + SP gradients equal TP=1 gradients.

Under SP each tensor rank holds ``T / tp`` of a row's tokens between the attention and
MLP blocks, so every row is padded to a multiple of the tensor size (``row_to_tensors``)
and the norms' weight gradients are summed over the tensor group (``model/norm.py``).
The sample lengths below are odd so that packed rows, lone samples and the last chunk of
a long sample all need padding; the reference is an unpadded TP=1 run on the same weights.
"""

from __future__ import annotations

import pytest
import torch

from _workers import make_samples, rel_diff, sp_layout_check, sp_reference
from chunkflow.config import load_config
from chunkflow.config.loader import ConfigError
from chunkflow.data.plan import plan_chunkflow_step, plan_megatron_step
from chunkflow.parallel.spawn import run_distributed

# C = 64: 65 -> chunks 64 + 1, 199 -> 64 + 64 + 64 + 7 (odd last chunks), 101 -> 64 + 37;
# the short ones pack into rows of odd length.
LENGTHS = [13, 6, 31, 65, 199, 7, 101, 45]
FP64 = ["model.dtype=fp64"]
SP = ["parallel.sequence_parallel=true"]
RUNS = [("megatron", None, None), ("chunkflow", 1, 64), ("chunkflow", 2, 64)]
TOL = 1e-10
NORMS = ("input_layernorm.weight", "pre_mlp_layernorm.weight", "final_layernorm.weight")


@pytest.fixture(scope="module")
def samples():
    return make_samples(LENGTHS, seed=3)


@pytest.fixture(scope="module")
def ref(samples):
    return run_distributed(sp_reference, 1, (FP64, samples, (1, 8)))[0]


def test_the_batch_needs_padding(samples):
    """Guards the test data: without odd rows the padding paths would not run."""
    mrows = plan_megatron_step(samples, dp_size=1, max_seq_len=512).rows_per_rank[0]
    crows = plan_chunkflow_step(samples, dp_size=1, chunk_size=64).rows_per_rank[0]
    assert any(len(r) % 2 for r in mrows)
    assert any(r.dependent and r.chunk_index == r.num_chunks - 1 and len(r) % 2 for r in crows)
    assert any(r.dependent and r.num_chunks > 2 for r in crows)


# ----------------------------------------------------------------------- norm, config
def _norm_config(sp: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=48, num_attention_heads=4, normalization="RMSNorm",
                             tensor_model_parallel_size=2 if sp else 1, sequence_parallel=sp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norm_is_bitwise_torch_rmsnorm_without_sp(dtype):
    from chunkflow.model.norm import RMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(_norm_config(False), 48, eps=1e-6), torch.nn.RMSNorm(48, eps=1e-6)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()] == ["weight"]
    assert ours.weight.dtype == theirs.weight.dtype == torch.float32
    w = torch.randn(48)
    if dtype == torch.float64:
        ours, theirs, w = ours.double(), theirs.double(), w.double()
    with torch.no_grad():
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    x = (torch.randn(7, 1, 48) * 5).to(dtype)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    assert yo.dtype == dtype and torch.equal(yo, yt)
    g = torch.randn_like(yo)
    yo.backward(g)
    yt.backward(g)
    assert torch.equal(xo.grad, xt.grad) and torch.equal(ours.weight.grad, theirs.weight.grad)
    assert not ours.weight.sequence_parallel
    if dtype == torch.bfloat16:  # normalised and scaled in fp32, rounded once
        h = x.float()
        want = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(dtype)
        assert torch.equal(yo, want)


def test_norm_weight_is_marked_for_the_tp_all_reduce_under_sp():
    from chunkflow.model.norm import RMSNorm

    assert RMSNorm(_norm_config(True), 48).weight.sequence_parallel is True


@pytest.mark.parametrize("overrides, expected", [
    (["data.pad_to_multiple=0"], "data.pad_to_multiple=0 is invalid"),
    (["data.pad_to_multiple=-8"], "use an integer >= 1"),
    # lcm(3, 2) = 6 does not divide 64
    (["parallel.tensor=2", *SP, "data.pad_to_multiple=3", "chunkflow.chunk_size=64"],
     "use a positive multiple of 6 (data.pad_to_multiple=3, parallel.tensor=2 with sequence parallelism)"),
    (["parallel.tensor=2", *SP, "chunkflow.chunk_size=63"], "e.g. 62"),
    # padding a full chunk would put padding between chunks of one sample
    (["data.pad_to_multiple=8", "chunkflow.chunk_size=60"], "use a positive multiple of 8"),
])
def test_chunk_size_must_be_a_multiple_of_the_row_padding(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.max_seq_len=512", *overrides])
    assert expected in str(e.value)


def test_padded_layouts_that_fit_are_accepted():
    from chunkflow.train.build import row_pad_multiple

    cfg = load_config(None, ["data.max_seq_len=512", "parallel.tensor=2", *SP, "data.pad_to_multiple=3",
                             "chunkflow.chunk_size=96"])
    assert row_pad_multiple(cfg) == 6
    cfg = load_config(None, ["data.max_seq_len=512", "parallel.tensor=4", *SP, "data.pad_to_multiple=8",
                             "model.num_attention_heads=8", "model.num_query_groups=4",
                             "chunkflow.chunk_size=64"])
    assert row_pad_multiple(cfg) == 8


# ------------------------------------------------------------------ padding at TP = 1
@pytest.mark.megatron
@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["megatron", "chunkflow"])
def test_padding_changes_neither_loss_nor_loss_tokens(ref, schedule):
    plain, padded = ref["padding"][(schedule, 1)], ref["padding"][(schedule, 8)]
    assert padded["num_loss_tokens"] == plain["num_loss_tokens"] == plain["plan_loss_tokens"]
    assert abs(padded["loss_sum"] - plain["loss_sum"]) <= TOL * abs(plain["loss_sum"])
    assert abs(plain["loss_sum"] / plain["num_loss_tokens"] - ref["loss"]) <= TOL * ref["loss"]
    worst = max(rel_diff(padded["grads"][n], g) for n, g in plain["grads"].items())
    assert worst <= TOL, f"{schedule}: padding moved the gradients by {worst:.2e}"


# ------------------------------------------------------------------- TP = 2 + SP
def _check_runs(results, ref):
    for r in results:
        assert r["grad"] <= TOL, f"{r['run']}: max relative gradient difference {r['grad']:.2e}"
        if r["loss"] is not None:
            assert abs(r["loss"] - ref["loss"]) <= TOL * ref["loss"], r


@pytest.fixture(scope="module")
def tp2_sp(samples, ref):
    layout = FP64 + SP + ["parallel.tensor=2", "parallel.pipeline=1"]
    return run_distributed(sp_layout_check, 2, (layout, samples, ref, RUNS))


@pytest.mark.megatron
@pytest.mark.slow
def test_tp2_sp_gradients_match_tp1(tp2_sp, ref):
    for rank in tp2_sp:
        _check_runs(rank["results"], ref)


@pytest.mark.megatron
@pytest.mark.slow
def test_every_norm_weight_and_only_they_are_sequence_parallel(tp2_sp):
    marked = tp2_sp[0]["sp_params"]
    assert len(marked) == 2 * 4 + 1
    assert all(n.endswith(NORMS) for n in marked)


@pytest.mark.megatron
@pytest.mark.slow
def test_token_losses_are_per_token_over_the_padded_row(tp2_sp, ref):
    """The embedding scatters to the SP region and the output layer gathers: both loss
    paths return ``(1, padded T)``, whose real tokens match TP=1."""
    for rank in tp2_sp:
        for got, want in zip(rank["token_losses"], ref["token_losses"]):
            n = got["len"]
            assert n % 2 == 1 and got["padded"] == n + 1
            assert want["ours"].shape == (1, n)
            assert got["ours"].shape == got["megatron"].shape == (1, n + 1)
            assert rel_diff(got["ours"][:, :n], want["ours"]) <= TOL
            # megatron's own cross-entropy runs in fp32
            assert rel_diff(got["megatron"][:, :n], want["ours"]) <= 1e-6


@pytest.mark.megatron
@pytest.mark.slow
def test_pp2_tp2_sp_matches_tp1(samples, ref):
    """Both schedules across two stages: the p2p buffers hold ``padded T / tp`` tokens."""
    layout = FP64 + SP + ["parallel.tensor=2", "parallel.pipeline=2"]
    per_rank = run_distributed(sp_layout_check, 4, (layout, samples, ref, RUNS))
    for rank in per_rank:
        _check_runs(rank["results"], ref)
