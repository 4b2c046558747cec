"""``chunkflow.verify`` / ``scripts/verify_equivalence.py``: a verdict users can trust.

In-process: the gradient comparison names a NaN/inf in any parameter (a late one too,
either side) and the report FAILs on it or on a non-finite loss; a configuration error
exits 2.

One spawn of 2 gloo ranks runs every model-level case (each re-initialises the layout):

* PASS on PP=2 (fp32) and on DP=2 (fp64) with data that has dependent chunks;
* DP=2 with the distributed optimizer (megatron reduce-scatters the gradients): PASS
  with the same difference as without it, and FAIL once ChunkFlow's gradient (not its
  loss) is scaled by 1 + 1e-6 on one rank;
* FAIL naming a NaN injected late in ChunkFlow's gradients on rank 1 and an inf in
  Megatron's on rank 0;
* starting from a chunkflow checkpoint (saved with DP=2, loaded at PP=2) and from a
  Hugging Face directory (DP=2, distributed optimizer): the verify loss is the loss of
  those weights (computed from the saved model; by transformers), not a random init's;
* the script: exit 0 and 1, and its last line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
from pathlib import Path

import pytest
import torch

from chunkflow.parallel.spawn import run_distributed
from chunkflow.verify import EquivalenceReport, compare_grads

ROOT = Path(__file__).resolve().parents[1]
DATA = ["data.max_seq_len=256", "data.global_batch_size=8", "data.synthetic.num_samples=64",
        "data.synthetic.short_fraction=0.4", "data.synthetic.medium_fraction=0.3",
        "data.synthetic.long_fraction=0.3", "data.synthetic.max_len_fraction=0.0",
        "chunkflow.chunk_size=32", "chunkflow.k=2"]
PP2 = ["parallel.pipeline=2"]
DP2 = ["parallel.pipeline=1"]
FP64 = ["model.dtype=fp64"]
DISTOPT = ["train.distributed_optimizer=true"]
GRAD_SCALE = 1 + 1e-6


def _script():
    spec = importlib.util.spec_from_file_location("verify_equivalence_script", ROOT / "scripts/verify_equivalence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- in-process
def _grads(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"p{i}": torch.randn(5, 3, generator=g, dtype=torch.float64) for i in range(n)}


def test_compare_grads_names_a_late_nonfinite_parameter() -> None:
    ref = _grads()
    got = {k: v.clone() for k, v in ref.items()}
    got["p0"] += 1e-3  # a finite difference first: a running max must not keep it over NaN
    got["p3"][2, 1] = float("nan")
    worst, name, bad = compare_grads(ref, got)
    assert worst == math.inf and name == "p3" and bad == ["chunkflow grad p3"]

    ref2 = {k: v.clone() for k, v in ref.items()}
    ref2["p2"][0, 0] = float("-inf")
    worst, name, bad = compare_grads(ref2, ref)
    assert worst == math.inf and name == "p2" and bad == ["megatron grad p2"]

    worst, name, bad = compare_grads(ref, {k: v for k, v in ref.items() if k != "p1"})
    assert name == "p1" and bad == ["chunkflow grad p1 missing"]

    got = {k: v * (1 + 1e-7) for k, v in ref.items()}
    worst, name, bad = compare_grads(ref, got)
    assert bad == [] and worst == pytest.approx(1e-7, rel=1e-6)


def test_report_fails_on_nonfinite() -> None:
    base = dict(max_rel_grad_diff=1e-7, worst_param="p", loss_megatron=2.0, loss_chunkflow=2.0,
                tolerance=1e-5, num_tokens=10, num_chunks=2, num_dependent_chunks=0)
    assert EquivalenceReport(**base).ok
    assert not EquivalenceReport(**{**base, "loss_chunkflow": float("nan")}).ok
    assert not EquivalenceReport(**{**base, "loss_megatron": float("inf"), "loss_chunkflow": float("inf")}).ok
    assert not EquivalenceReport(**{**base, "max_rel_grad_diff": float("nan")}).ok
    assert not EquivalenceReport(**base, nonfinite=("chunkflow grad p",)).ok
    assert not EquivalenceReport(**{**base, "loss_chunkflow": 2.0 * (1 + 2e-5)}).ok


def test_script_config_error_exits_2(capsys) -> None:
    assert _script().main(["--config", str(ROOT / "configs/tiny_cpu.yaml"), "chunkflow.k=0"]) == 2
    assert "config error" in capsys.readouterr().err


# --------------------------------------------------------------------------- spawned
def _cfg(overrides):
    from _workers import TINY

    from chunkflow.config import load_config

    return load_config(None, list(TINY) + DATA + list(overrides))


def _verify(overrides):
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.verify import verify_equivalence

    cfg = _cfg(overrides)
    return verify_equivalence(cfg, init_distributed(cfg))


def _first_batch_loss(cfg, ctx, ddp) -> float:
    """The Megatron path's loss of the configured first batch on ``ddp``'s weights."""
    import torch.distributed as dist

    from chunkflow.data.dataset import load_samples
    from chunkflow.data.loader import GlobalBatchLoader
    from chunkflow.data.plan import plan_megatron_step
    from chunkflow.train.megatron_schedule import MegatronSchedule

    samples, _ = load_samples(cfg.data, vocab_size=cfg.model.vocab_size)
    batch = next(iter(GlobalBatchLoader(samples, global_batch_size=cfg.data.global_batch_size,
                                        seed=cfg.data.seed, shuffle=cfg.data.shuffle)))
    plan = plan_megatron_step(batch, dp_size=ctx.dp_size, max_seq_len=cfg.data.max_seq_len)
    ddp.zero_grad_buffer()
    res = MegatronSchedule(ddp, ctx.device).run(plan.rows_per_rank[ctx.dp_rank])
    t = torch.tensor([res.loss_sum], dtype=torch.float64)
    dist.all_reduce(t, group=ctx.dp_group)
    return float(t[0]) / plan.num_loss_tokens


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _scaled_grad_loss(rank: int, scale: float = GRAD_SCALE):
    """ChunkFlow's masked loss with its gradient (not its reported value) scaled on ``rank``."""
    import torch.distributed as dist

    from chunkflow.model.loss import masked_loss

    def loss(mask, output):
        total, count, report = masked_loss(mask, output)
        if dist.get_rank() == rank:
            total = total * scale
        return total, count, report

    return loss


def _poison(cls, rank: int, value: float, which: int):
    """``cls.run`` that writes ``value`` into one element of a late parameter's gradient
    (``which``: index from the end of ``named_parameters``) on ``rank``."""
    import torch.distributed as dist

    original = cls.run

    def run(self, rows):
        out = original(self, rows)
        if dist.get_rank() == rank:
            module = self.model.module
            _, p = list(module.named_parameters())[-which]
            p.main_grad.view(-1)[3] = value
        return out

    return run


def verify_suite(rank: int, world: int, tmp: str, hf_dir: str) -> dict:
    import torch.distributed as dist

    import chunkflow.parallel.distributed as distributed
    from chunkflow.model.state import global_name, layer_offset
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.pipeline import executor
    from chunkflow.train.build import build_model_and_ddp
    from chunkflow.train.checkpoint import save_checkpoint
    from chunkflow.train.megatron_schedule import MegatronSchedule

    out: dict = {}
    out["pp2_fp32"] = _verify(PP2)
    out["dp2_fp64"] = _verify(DP2 + FP64)
    out["dp2_fp64_distopt"] = _verify(DP2 + FP64 + DISTOPT)
    with _patched(executor, "masked_loss", _scaled_grad_loss(rank=1)):
        out["dp2_fp64_distopt_perturbed"] = _verify(DP2 + FP64 + DISTOPT)
    names = []
    for which in (1, 2):
        cfg = _cfg(DP2)
        ddp, _ = build_model_and_ddp(cfg, init_distributed(cfg))
        names.append(global_name(list(ddp.module.named_parameters())[-which][0], layer_offset(ddp)))
    out["poisoned_names"] = names  # [ChunkFlow's NaN (rank 1), Megatron's inf (rank 0)]
    with _patched(executor.ChunkFlowSchedule, "run", _poison(executor.ChunkFlowSchedule, 1, float("nan"), 1)), \
            _patched(MegatronSchedule, "run", _poison(MegatronSchedule, 0, float("inf"), 2)):
        out["dp2_nonfinite"] = _verify(DP2 + FP64)

    # A checkpoint of other weights (train.seed=7), saved with DP=2, verified at PP=2.
    cfg = _cfg(DP2 + FP64 + ["train.seed=7"])
    ctx = init_distributed(cfg)
    ddp, _ = build_model_and_ddp(cfg, ctx)
    out["ckpt_loss"] = _first_batch_loss(cfg, ctx, ddp)
    save_checkpoint(f"{tmp}/ckpt", model=ddp, optimizer=None,
                    trainer_state={"step": 0, "model_only": True}, rank=rank)
    dist.barrier()
    out["pp2_fp64_ckpt"] = _verify(PP2 + FP64 + [f"train.load={tmp}/ckpt"])
    out["pp2_fp64_random"] = _verify(PP2 + FP64)
    out["dp2_fp64_hf"] = _verify(DP2 + FP64 + DISTOPT + [f"model.hf_dir={hf_dir}"])

    # The script, twice in this group (its destroy_distributed would end the group).
    script = _script()
    argv = ["--config", str(ROOT / "configs/tiny_cpu.yaml")] + _tiny_args() + PP2
    runs = {}
    with _patched(distributed, "destroy_distributed", lambda: None):
        for name, loss in (("pass", executor.masked_loss), ("fail", _scaled_grad_loss(rank=1, scale=1.01))):
            buf = io.StringIO()
            with _patched(executor, "masked_loss", loss), contextlib.redirect_stdout(buf):
                code = script.main(argv)
            runs[name] = (code, buf.getvalue())
    out["script"] = runs
    return out


def _tiny_args() -> list:
    from _workers import TINY

    return list(TINY) + DATA


def _hf_model(path: Path):
    transformers = pytest.importorskip("transformers")
    # The tests' TINY sizes: model.hf_dir refuses an explicit field that disagrees with it.
    config = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=False,
                                      max_position_embeddings=512)
    torch.manual_seed(3)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _hf_loss(model, hf_dir: Path) -> float:
    """transformers' loss (fp64) of the verify configuration's first global batch."""
    from _workers import TINY

    from chunkflow.config import load_config
    from chunkflow.data.dataset import load_samples
    from chunkflow.data.loader import GlobalBatchLoader

    cfg = load_config(None, list(TINY) + DATA + [f"model.hf_dir={hf_dir}"])
    samples, _ = load_samples(cfg.data, vocab_size=cfg.model.vocab_size)
    batch = next(iter(GlobalBatchLoader(samples, global_batch_size=cfg.data.global_batch_size,
                                        seed=cfg.data.seed, shuffle=cfg.data.shuffle)))
    model = model.double()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for s in batch:
            logits = model(torch.from_numpy(s.input_ids)[None]).logits[0]
            ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(s.labels), reduction="none")
            mask = torch.from_numpy(s.loss_mask).double()
            total += float((ce * mask).sum())
            count += float(mask.sum())
    return total / count


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    hf_dir = tmp / "hf"
    model = _hf_model(hf_dir)
    ranks = run_distributed(verify_suite, world_size=2, args=(str(tmp), str(hf_dir)), timeout_s=900)
    out = ranks[0]
    out["rank1"] = ranks[1]
    out["hf_loss"] = _hf_loss(model, hf_dir)
    return out


def _passes(r: EquivalenceReport, dtype: str) -> None:
    assert r.ok, r
    assert r.nonfinite == ()
    assert r.num_dependent_chunks > 0
    assert r.max_rel_grad_diff <= {"fp32": 1e-5, "fp64": 1e-10}[dtype]


@pytest.mark.megatron
def test_pass_pp2_and_dp2(suite) -> None:
    _passes(suite["pp2_fp32"], "fp32")
    _passes(suite["dp2_fp64"], "fp64")
    for key in ("pp2_fp32", "dp2_fp64"):  # every rank reports the same verdict
        assert suite["rank1"][key] == suite[key]


@pytest.mark.megatron
def test_distributed_optimizer_dp2(suite) -> None:
    r, plain = suite["dp2_fp64_distopt"], suite["dp2_fp64"]
    _passes(r, "fp64")
    # The gathered reduce-scatter result is the all-reduced gradient: same difference.
    assert r.max_rel_grad_diff == pytest.approx(plain.max_rel_grad_diff, rel=1e-6, abs=1e-15)
    assert r.loss_megatron == pytest.approx(plain.loss_megatron, rel=1e-14)
    bad = suite["dp2_fp64_distopt_perturbed"]
    assert not bad.ok and bad.nonfinite == ()
    assert bad.max_rel_grad_diff > 1e-7  # ~ (GRAD_SCALE - 1) * rank 1's share of the gradient
    assert bad.rel_loss_diff <= 1e-10  # only the gradient was perturbed


@pytest.mark.megatron
def test_nonfinite_late_parameter_fails_on_every_rank(suite) -> None:
    nan_name, inf_name = suite["poisoned_names"]
    for r in (suite["dp2_nonfinite"], suite["rank1"]["dp2_nonfinite"]):
        assert not r.ok
        assert set(r.nonfinite) == {f"chunkflow grad {nan_name}", f"megatron grad {inf_name}"}
        assert r.max_rel_grad_diff == math.inf and r.worst_param in (nan_name, inf_name)


@pytest.mark.megatron
def test_starts_from_checkpoint_and_hf_weights(suite) -> None:
    ck, rnd = suite["pp2_fp64_ckpt"], suite["pp2_fp64_random"]
    _passes(ck, "fp64")
    assert ck.weights.startswith("checkpoint ") and rnd.weights.startswith("random init")
    assert ck.loss_megatron == pytest.approx(suite["ckpt_loss"], rel=1e-12)
    assert abs(rnd.loss_megatron - suite["ckpt_loss"]) > 1e-3  # a random init is told apart
    hf = suite["dp2_fp64_hf"]
    _passes(hf, "fp64")
    assert hf.weights.startswith("Hugging Face ")
    # transformers computes RoPE angles in fp32 even for an fp64 model: ~1e-9 apart.
    assert hf.loss_megatron == pytest.approx(suite["hf_loss"], rel=1e-7)
    assert abs(hf.loss_megatron - rnd.loss_megatron) > 1e-3


@pytest.mark.megatron
def test_script_exit_code_and_last_line(suite) -> None:
    code, text = suite["script"]["pass"]
    last = text.strip().splitlines()[-1]
    assert code == 0 and last.startswith("max_rel_grad_diff=") and float(last.split("=")[1]) <= 1e-5, text
    assert "-> OK" in text and "weights: random init" in text
    code, text = suite["script"]["fail"]
    last = text.strip().splitlines()[-1]
    assert code == 1 and last.startswith("max_rel_grad_diff=") and float(last.split("=")[1]) > 1e-5, text
    assert "-> FAIL" in text
    assert suite["rank1"]["script"]["pass"][1] == ""  # rank 0 prints, the others only exit
    assert suite["rank1"]["script"]["fail"][0] == 1
