"""One test per patch in ``chunkflow.parallel.cpu_compat``, each failing if its patch stops
working on the installed megatron-core (run on both supported versions: marked megatron).

Where it can, a test drives the megatron function that makes the CUDA call rather than the
patch itself. Multi-process facts come from one 2-rank gloo run (:func:`_two_rank_facts`):
a TP=2 phase (RNG streams, grad norm, dist checkpointing, no-pipelining schedule,
distributed optimizer) and a PP=2 phase (p2p shapes, 1F1B schedule, tied embeddings).
Every fact is computed in its own ``try`` so one broken patch fails one test.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

import pytest
import torch

import chunkflow  # noqa: F401  (installs the triton-free paged_stash stand-in)
from chunkflow.parallel import cpu_compat
from chunkflow.parallel.spawn import run_distributed

pytestmark = pytest.mark.megatron

TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=64",
    "data.max_seq_len=64", "data.global_batch_size=2", "chunkflow.chunk_size=32",
]
HIDDEN = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compat() -> bool:
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        pytest.skip("cpu_compat is a no-op with CUDA")
    return cpu_compat.apply_cpu_compat()


# ----------------------------------------------------------------- in-process
def test_patched_modules_see_cpu_torch(compat: bool) -> None:
    """Every listed module exists in this version and its ``torch`` maps CUDA to CPU
    (a renamed module would otherwise be skipped silently)."""
    import importlib

    assert compat
    for name in cpu_compat.PATCHED_MODULES:
        module = importlib.import_module(name)
        assert module.torch is not torch, f"{name} still sees the real torch"
        assert module.torch.cuda.current_device() == torch.device("cpu")
        assert module.torch.zeros(2, device="cuda").device.type == "cpu"
        assert module.torch.tensor([1, 2], device=0).device.type == "cpu"
    from megatron.core.pipeline_parallel import schedules

    # Scoped: the process-wide torch keeps its own factories and cuda module.
    assert schedules.torch.zeros is not torch.zeros and schedules.torch.cuda is not torch.cuda


def test_rng_tracker_reproducible_and_restores_default(compat: bool, caplog) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def draws(tp_rank: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        torch.manual_seed(99)
        mrandom.model_parallel_cuda_manual_seed(1234, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        before = torch.get_rng_state()
        with mrandom.get_cuda_rng_tracker().fork():
            forked = torch.rand(8)
        restored = torch.equal(before, torch.get_rng_state())
        return forked, torch.rand(8), restored

    with caplog.at_level(logging.WARNING):
        a0, d0, restored = draws(0)
        b0, e0, _ = draws(0)
        a1, d1, _ = draws(1)
    assert restored, "fork() did not restore the default generator"
    assert torch.equal(a0, b0) and torch.equal(d0, e0), "same seed and rank must repeat"
    assert not torch.equal(a0, a1), "TP ranks must get different model-parallel streams"
    assert torch.equal(d0, d1), "the default (data-parallel) stream must not depend on the TP rank"
    assert not torch.equal(a0, d0)
    torch.manual_seed(1234)
    assert torch.equal(d0, torch.rand(8)), "default generator seeded with the data-parallel seed"
    assert "CPU RNG state changed" not in caplog.text


def test_grad_clip_matches_hand_computation(compat: bool) -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    # The optimizer calls the name it imported; both must be the CPU version.
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    clip = optimizer.clip_grad_by_total_norm_fp32
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 4), (5,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    grads = [p.grad.clone() for p in params]
    total = float(torch.sqrt(sum((x.double() ** 2).sum() for x in grads)))
    max_norm = total / 4
    clip(params, max_norm, total)
    for p, x in zip(params, grads):
        torch.testing.assert_close(p.grad, x * (max_norm / (total + 1e-6)), rtol=1e-6, atol=0)
    after = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
    assert after == pytest.approx(max_norm, rel=1e-5)
    # Below the threshold nothing changes; a tensor norm is accepted too.
    before = [p.grad.clone() for p in params]
    clip(params, 10 * after, torch.tensor([after]))
    assert all(torch.equal(p.grad, x) for p, x in zip(params, before))
    # Decoupled grads (precision-aware optimizer) are scaled instead of .grad.
    q = torch.nn.Parameter(torch.zeros(3))
    q.decoupled_grad = torch.tensor([3.0, 4.0, 0.0])
    clip([q], 1.0, 5.0, use_decoupled_grad=True)
    torch.testing.assert_close(q.decoupled_grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=0)


def test_cuda_tensor_methods_scoped(compat: bool) -> None:
    """``type()`` names the CUDA twin and ``cuda()`` stays on CPU only inside the
    wrapped megatron methods."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for fn in (Float16OptimizerWithFloat16Params.__init__, DistributedOptimizer.__init__,
               LanguageModule.setup_embeddings_and_output_layer):
        assert getattr(fn, "_chunkflow_wrapped", False), fn
    t = torch.zeros(2, dtype=torch.bfloat16)
    with cpu_compat._cuda_tensor_methods():
        assert t.type() == "torch.cuda.BFloat16Tensor"
        assert t.cuda() is t
        assert t.type(torch.float32).dtype == torch.float32  # conversions untouched
    assert t.type() == "torch.BFloat16Tensor"
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda()


def test_paged_stash_standin_only_without_triton() -> None:
    import importlib.util

    name = "megatron.core.transformer.moe.ops.paged_stash"
    module = sys.modules.get(name)
    if importlib.util.find_spec("triton") is None:
        assert module is not None and getattr(module, "__file__", None) is None, "expected the stand-in"
        with pytest.raises(RuntimeError, match="triton"):
            module.paged_stash_copy_kernel()
        import megatron.core  # noqa: F401  (0.17+ imports paged_stash here)
    else:  # pragma: no cover - machines with triton
        assert module is None or getattr(module, "__file__", None)
    # With a (fake) triton importable, no stand-in is registered.
    fake = _run_python(
        """
        import sys, chunkflow
        print(json.dumps({"stub": "megatron.core.transformer.moe.ops.paged_stash" in sys.modules}))
        """,
        extra_path=_fake_triton_dir(),
    )
    assert fake == {"stub": False}


def test_noop_when_cuda_reported_available() -> None:
    """In a fresh interpreter with ``torch.cuda.is_available() -> True``, nothing is patched."""
    result = _run_python(
        """
        import importlib, torch
        torch.cuda.is_available = lambda: True
        import chunkflow
        from chunkflow.parallel import cpu_compat as cc
        applied = cc.apply_cpu_compat()
        views = [n for n in cc.PATCHED_MODULES if importlib.import_module(n).torch is not torch]
        from megatron.core.tensor_parallel import random as r
        from megatron.core.optimizer import clip_grads, optimizer
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        wrapped = [f.__qualname__ for f in (optimizer.Float16OptimizerWithFloat16Params.__init__,
                   DistributedOptimizer.__init__) if getattr(f, "_chunkflow_wrapped", False)]
        print(json.dumps({
            "applied": applied, "active": cc.cpu_compat_active(), "views": views,
            "rng": r._get_cuda_rng_state.__module__,
            "clip": [clip_grads.clip_grad_by_total_norm_fp32.__module__,
                     optimizer.clip_grad_by_total_norm_fp32.__module__],
            "wrapped": wrapped, "tensor_cuda": torch.Tensor.cuda is torch._C.TensorBase.cuda,
        }))
        """
    )
    assert result["applied"] is False and result["active"] is False
    assert result["views"] == []
    assert result["rng"] == "megatron.core.tensor_parallel.random"
    assert result["clip"] == ["megatron.core.optimizer.clip_grads"] * 2
    assert result["wrapped"] == [] and result["tensor_cuda"]


def test_notice_filters_drop_only_listed_notices(caplog) -> None:
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    assert logger.filters, "`import chunkflow` should have installed the notice filters"
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("GPTModel IS DEPRECATED. use HybridModel")
        logger.warning("something else")
    assert "DEPRECATED" not in caplog.text and "something else" in caplog.text
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        cpu_compat.quiet_megatron_notices()  # catch_warnings reset the filters
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("an unrelated warning", UserWarning)
    assert [str(w.message) for w in seen] == ["an unrelated warning"]


def test_transformer_config_without_deprecation_warnings() -> None:
    """The config we build triggers no deprecation notice (0.19 renamed cuda_graph_scope)."""
    from chunkflow.config import load_config
    from chunkflow.model.provider import build_transformer_config

    cfg = load_config(None, TINY)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_transformer_config(cfg)
    assert [str(w.message) for w in seen if "deprecat" in str(w.message).lower()] == []


# ----------------------------------------------------------------- two ranks
@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> list[dict]:
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        pytest.skip("cpu_compat is a no-op with CUDA")
    ckpt = tmp_path_factory.mktemp("dist_ckpt")
    return run_distributed(_two_rank_facts, 2, (str(ckpt),), timeout_s=240)


def _fact(facts: list[dict], key: str) -> list:
    values = []
    for rank, f in enumerate(facts):
        value = f[key]
        if isinstance(value, dict) and "error" in value:
            pytest.fail(f"rank {rank}, {key}:\n{value['error']}")
        values.append(value)
    return values


def test_rng_streams_per_tp_rank(facts) -> None:
    r0, r1 = _fact(facts, "rng")
    assert not torch.equal(r0["forked"], r1["forked"]), "TP ranks share the model-parallel stream"
    assert torch.equal(r0["default"], r1["default"]), "default stream differs across TP ranks"
    assert r0["restored"] and r1["restored"]


def test_grad_norm_and_clip_across_tp_ranks(facts) -> None:
    r0, r1 = _fact(facts, "clip")
    grads = [r0["grads"], r1["grads"]]
    total = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    assert r0["norm"] == pytest.approx(total, rel=1e-6) and r1["norm"] == pytest.approx(total, rel=1e-6)
    for r, g in zip((r0, r1), grads):
        torch.testing.assert_close(r["clipped"], g * (r["max_norm"] / (total + 1e-6)), rtol=1e-6, atol=0)


def test_dist_checkpoint_round_trip(facts) -> None:
    r0, r1 = _fact(facts, "ckpt")
    full = torch.arange(24.0).reshape(4, 6)
    torch.testing.assert_close(r0["shard"], full[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(r1["shard"], full[:, 3:], rtol=0, atol=0)
    for r in (r0, r1):  # resharded TP2 -> one full tensor per rank
        torch.testing.assert_close(r["full"], full, rtol=0, atol=0)
        assert r["common"] == {"step": 7}


def test_schedules_count_tokens_on_cpu(facts) -> None:
    """megatron's schedules make ``total_num_tokens`` with ``device="cuda"``."""
    for name in ("no_pipelining", "one_f_one_b"):
        r0, r1 = _fact(facts, name)
        for r in (r0, r1):
            assert r["device"] == "cpu" and r["tokens"] == r["expected_tokens"], (name, r)
    for r in _fact(facts, "one_f_one_b"):  # and the 1F1B gradients equal a local reference
        torch.testing.assert_close(r["grad"], r["ref_grad"], rtol=1e-5, atol=1e-6)


def test_p2p_variable_shapes(facts) -> None:
    r0, r1 = _fact(facts, "p2p")  # rank 0 sends activations, rank 1 sends a gradient back
    assert r1["recv_shapes"] == [[5, 1, HIDDEN], [3, 1, HIDDEN]]
    assert r1["recv_equal"] and r1["devices"] == ["cpu", "cpu"]
    assert r0["grad_shapes"] == [[5, 1, HIDDEN]] and r0["grad_equal"]


def test_distributed_optimizer_steps_on_cpu(facts) -> None:
    for r in _fact(facts, "dist_opt"):
        assert r["ok"] and r["changed"] and r["grad_norm"] > 0


def test_tied_embeddings_across_stages(facts) -> None:
    first, last = _fact(facts, "tied")
    assert first["stage"] == "first" and last["stage"] == "last"
    assert float(first["weight"].abs().sum()) > 0
    torch.testing.assert_close(first["weight"], last["weight"], rtol=0, atol=0)


# ----------------------------------------------------------------- helpers
def _run_python(body: str, extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    code = "import json, warnings\nwarnings.simplefilter('ignore')\n" + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fake_triton_dir() -> str:
    import tempfile

    root = tempfile.mkdtemp(prefix="fake_triton_")
    os.makedirs(os.path.join(root, "triton"))
    Path(root, "triton", "__init__.py").write_text("")
    return root


def _attempt(fn, *args):
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - reported by the test that reads this fact
        return {"error": traceback.format_exc()}


def _two_rank_facts(rank: int, world: int, ckpt_dir: str) -> dict:
    from chunkflow.config import load_config
    from chunkflow.parallel.distributed import init_distributed

    facts: dict = {}
    cfg = load_config(None, TINY + ["parallel.tensor=2", "parallel.pipeline=1"])
    ctx = init_distributed(cfg)
    facts["rng"] = _attempt(_rng_draws)
    facts["clip"] = _attempt(_grad_norm_and_clip, ctx)
    facts["ckpt"] = _attempt(_checkpoint_round_trip, ctx, ckpt_dir)
    facts["no_pipelining"] = _attempt(_schedule_run, cfg, ctx)
    facts["dist_opt"] = _attempt(_distributed_optimizer_step, ctx)

    cfg = load_config(None, TINY + ["parallel.tensor=1", "parallel.pipeline=2"])
    ctx = init_distributed(cfg)
    facts["p2p"] = _attempt(_p2p_exchange, cfg, ctx)
    facts["one_f_one_b"] = _attempt(_schedule_run, cfg, ctx)
    facts["tied"] = _attempt(_tied_embeddings, ctx)
    return facts


def _rng_draws() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(8)
    restored = torch.equal(before, torch.get_rng_state())
    return {"forked": forked, "default": torch.rand(8), "restored": restored}


def _grad_norm_and_clip(ctx) -> dict:
    from megatron.core.optimizer import clip_grads, optimizer

    g = torch.Generator().manual_seed(10 + ctx.tp_rank)
    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(7))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    norm = float(clip_grads.get_grad_norm_fp32([p.grad for p in params], grad_stats_parallel_group=ctx.tp_group))
    max_norm = norm / 3
    optimizer.clip_grad_by_total_norm_fp32(params, max_norm, norm)
    clipped = torch.cat([p.grad.reshape(-1) for p in params])
    return {"grads": grads, "norm": norm, "max_norm": max_norm, "clipped": clipped}


def _checkpoint_round_trip(ctx, ckpt_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    full = torch.arange(24.0).reshape(4, 6)
    r, n = ctx.tp_rank, ctx.tp_size
    shard = full.chunk(n, dim=1)[r].clone()
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", shard, (1, r, n)),
                             "common": {"step": 7}}, ckpt_dir)
    dist.barrier()
    mine = dist_checkpointing.load(
        {"w": ShardedTensor.from_rank_offsets("w", torch.zeros_like(shard), (1, r, n))}, ckpt_dir)
    whole = dist_checkpointing.load(
        {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4, 6), replica_id=r)}, ckpt_dir)
    return {"shard": mine["w"], "full": whole["w"], "common": mine.get("common")}


class _Stage(torch.nn.Module):
    """One linear layer per pipeline stage, with the hooks megatron's schedules call."""

    def __init__(self, config, weight: torch.Tensor, first: bool) -> None:
        super().__init__()
        from megatron.core.enums import ModelType

        self.config, self.first, self.input_tensor = config, first, None
        self.model_type = ModelType.encoder_or_decoder
        self.linear = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x if self.first else self.input_tensor)


def _schedule_run(cfg, ctx) -> dict:
    """Stock schedule (no pipelining at PP=1, 1F1B at PP=2) on micro-batches of different
    lengths; ``finalize_model_grads_func`` sees megatron's ``total_num_tokens``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from chunkflow.model.provider import build_transformer_config

    tc = build_transformer_config(cfg)
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5 for _ in range(2)]
    lengths = [5, 3, 7, 4]
    inputs = [torch.randn(n, 1, HIDDEN, generator=g) for n in lengths]
    stage = ctx.pp_rank if ctx.pp_size > 1 else 0
    model = _Stage(tc, weights[stage], first=stage == 0)
    seen: dict = {}

    def finalize(models, num_tokens=None, *args, **kwargs) -> None:
        seen["device"], seen["tokens"] = num_tokens.device.type, int(num_tokens)

    def loss(out: torch.Tensor):
        return out.pow(2).sum(), torch.tensor(out.shape[0], dtype=torch.int), {}

    def step(data_iterator, m):
        return m(next(data_iterator)), loss

    tc.finalize_model_grads_func = finalize
    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(inputs), model=[model],
        num_microbatches=len(inputs), seq_length=max(lengths), micro_batch_size=1, forward_only=False,
    )
    # Reference: the same stage(s) in one process.
    ref = [torch.nn.Parameter(w.clone()) for w in weights[: 1 if ctx.pp_size == 1 else 2]]
    for x in inputs:
        h = x
        for w in ref:
            h = h @ w.t()
        h.pow(2).sum().backward()
    # Only the last stage computes the loss, so only it counts tokens.
    expected = sum(lengths) if ctx.is_last_stage else 0
    return {"device": seen.get("device"), "tokens": seen.get("tokens"), "expected_tokens": expected,
            "grad": model.linear.weight.grad, "ref_grad": ref[stage].grad}


def _p2p_exchange(cfg, ctx) -> dict:
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from chunkflow.model.provider import build_transformer_config

    comm = P2PCommunicator(ctx.pp_group, build_transformer_config(cfg))
    g = torch.Generator().manual_seed(3)
    sent = [torch.randn(n, 1, HIDDEN, generator=g) for n in (5, 3)]
    grad = torch.randn(5, 1, HIDDEN, generator=g)
    wrong_shape = (999, 1, HIDDEN)  # variable_seq_lengths: the real shape is sent first
    if ctx.is_first_stage:
        for t in sent:
            comm.send_forward(t, is_last_stage=False)
        got = comm.recv_backward(wrong_shape, is_last_stage=False)
        return {"grad_shapes": [list(got.shape)], "grad_equal": torch.equal(got, grad)}
    got = [comm.recv_forward(wrong_shape, is_first_stage=False) for _ in sent]
    comm.send_backward(grad, is_first_stage=False)
    return {"recv_shapes": [list(t.shape) for t in got],
            "recv_equal": all(torch.equal(a, b) for a, b in zip(got, sent)),
            "devices": [t.device.type for t in got]}


def _distributed_optimizer_step(ctx) -> dict:
    from chunkflow.config import load_config
    from chunkflow.model.provider import build_model, build_transformer_config
    from chunkflow.train.optim import build_optimizer, wrap_ddp

    cfg = load_config(None, TINY + ["parallel.tensor=2", "parallel.pipeline=1",
                                    "train.distributed_optimizer=true"])
    tc = build_transformer_config(cfg)
    ddp = wrap_ddp(build_model(cfg, pre_process=True, post_process=True, transformer_config=tc), tc, cfg)
    opt = build_optimizer(ddp, cfg)
    before = [p.detach().clone() for p in ddp.parameters()]
    ids = torch.arange(16).remainder(cfg.model.vocab_size).unsqueeze(0)
    ddp.zero_grad_buffer()
    ddp(ids, torch.arange(16).unsqueeze(0), None, labels=ids.roll(-1, 1)).sum().backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = opt.step()
    changed = any(not torch.equal(b, p) for b, p in zip(before, ddp.parameters()))
    return {"ok": bool(ok), "changed": changed, "grad_norm": float(grad_norm)}


def _tied_embeddings(ctx) -> dict:
    """With PP=2 the last stage's output layer starts as a copy of the first stage's
    embedding (megatron zeroes it, moves it with ``.cuda()`` and all-reduces)."""
    from chunkflow.config import load_config
    from chunkflow.model.provider import build_model

    cfg = load_config(None, TINY + ["parallel.tensor=1", "parallel.pipeline=2", "model.tie_embeddings=true"])
    model = build_model(cfg, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage)
    weight = model.shared_embedding_or_output_weight().detach().clone()
    return {"stage": "first" if ctx.is_first_stage else "last", "weight": weight}
