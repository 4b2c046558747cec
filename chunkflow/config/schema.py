"""The typed configuration tree. Every field is declared, documented and defaulted here;
YAML files and ``a.b=c`` command-line overrides only change values (see ``loader.py``).

The defaults describe the tiny CPU model of ``configs/tiny_cpu.yaml`` so that a config
file only has to state what differs. ``validate.py`` checks every field: each name field
against its tuple below (``CHOICES``), each number against its range (``NUMBER_RULES``;
NaN and infinity never pass), then the rules that tie fields together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "SyntheticConfig",
    "DataConfig",
    "TrainConfig",
    "ChunkFlowConfig",
    "SpaCOConfig",
    "LoRAConfig",
    "BenchConfig",
    "LogConfig",
    "Config",
    "SCHEDULES",
    "MODES",
    "SPACO_SAMPLERS",
    "LORA_TARGETS",
    "RECOMPUTE",
    "DTYPES",
    "OVERLONG",
    "BACKENDS",
    "TINY_DEFAULT_FIELDS",
    "TINY_DEFAULT_MAX_HIDDEN",
    "NONFINITE",
    "SIGNALS",
    "AUTO",
    "IntOrAuto",
]

SCHEDULES = ("megatron", "chunkflow")
MODES = ("chunkflow", "seco", "spaco")  # chunkflow.mode, see ChunkFlowConfig
SPACO_SAMPLERS = ("bernoulli", "without_replacement")
# LoRA targets, named like Hugging Face's projections; megatron fuses q/k/v into
# linear_qkv and gate/up into linear_fc1 (each target then adapts its rows only).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECOMPUTE = ("none", "selective", "block", "full")
LENGTH_DISTRIBUTIONS = ("bands", "llama3_sft")  # data.synthetic.distribution
DTYPES = ("fp32", "bf16", "fp16", "fp64")
OVERLONG = ("error", "truncate", "drop")
BACKENDS = ("auto", "gloo", "nccl")  # parallel.backend
NONFINITE = ("abort", "skip")  # train.nonfinite
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")  # train.preempt_signals
# chunkflow.chunk_size and chunkflow.k take a whole number or AUTO: the trainer then picks
# them from train.memory_budget_mb (chunkflow/train/autotune.py, docs/autotune.md).
AUTO = "auto"
IntOrAuto = Union[int, str]
# A large model (hidden_size >= TINY_DEFAULT_MAX_HIDDEN, 8x the tiny default) whose config
# never set one of these fields (YAML, override or model.hf_dir) still has the tiny CPU
# value, e.g. hidden_size 3584 with vocab_size 512: an error lists them and suggests
# model.hf_dir. A field set explicitly to the same value is accepted.
TINY_DEFAULT_FIELDS = ("num_layers", "ffn_hidden_size", "num_attention_heads", "vocab_size")
TINY_DEFAULT_MAX_HIDDEN = 1024


@dataclass
class ModelConfig:
    """A Qwen2 / Llama style decoder (RMSNorm, SwiGLU, RoPE, GQA).

    The defaults are a tiny CPU model. A large ``hidden_size`` with any of
    ``TINY_DEFAULT_FIELDS`` never set is refused (see above): set them, or ``hf_dir``.
    """

    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 344  # SwiGLU inner width
    num_attention_heads: int = 4
    num_query_groups: int = 2  # GQA: key/value heads; == heads means MHA
    vocab_size: int = 512
    rope_base: float = 10000.0
    norm_epsilon: float = 1e-6
    qkv_bias: bool = True  # Qwen2 has q/k/v biases, Llama does not
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "fp32"  # one of DTYPES; CPU runs use fp32 (no bf16 units here)
    # Hugging Face model directory (config.json, *.safetensors, tokenizer.json) to start
    # from: its config.json sets the architecture fields above (num_layers .. init_std,
    # logged as "model.hf_dir sets ..."); setting one of them to a different value in the
    # YAML or on the command line is an error. Its weights are loaded (each rank reads
    # only its shard) unless train.load is set, and its tokenizer.json becomes
    # data.tokenizer when that is empty. See docs/hf.md.
    hf_dir: str = ""


@dataclass
class ParallelConfig:
    """Model-parallel sizes; the data-parallel size is world_size / (tensor * pipeline)."""

    tensor: int = 1
    pipeline: int = 1
    sequence_parallel: bool = False
    backend: str = "auto"  # BACKENDS: auto (cpu:gloo,cuda:nccl with CUDA, else gloo) | gloo | nccl
    threads_per_rank: int = 1  # torch intra-op threads per process on CPU
    timeout_s: int = 600  # process-group timeout


@dataclass
class SyntheticConfig:
    """Deterministic long-tailed synthetic data (used when ``data.path`` is empty)."""

    num_samples: int = 2048
    # Fractions of samples in each length band, relative to data.max_seq_len:
    # (0, 1/32], (1/32, 1/8], (1/8, 1]; a further `max_len_fraction` sit exactly at max.
    short_fraction: float = 0.90
    medium_fraction: float = 0.08
    long_fraction: float = 0.02
    max_len_fraction: float = 0.005
    min_len: int = 8
    # "bands": the fractions above. "llama3_sft": the category mix and mean lengths of
    # Llama 3's SFT data (data/synthetic.py, LLAMA3_SFT), each category exponential with
    # its mean divided by length_scale, cut to [min_len, data.max_seq_len]; the band
    # fractions are then unused. One of LENGTH_DISTRIBUTIONS.
    distribution: str = "bands"
    length_scale: float = 1.0  # llama3_sft: published token counts / this = our lengths


@dataclass
class DataConfig:
    # JSONL file, token store (scripts/prepare_data.py) or Megatron .bin/.idx prefix;
    # empty = synthetic data. See docs/data.md.
    path: str = ""
    # Local tokenizer directory (tokenizer.json + optional tokenizer_config.json) or its
    # tokenizer.json, for "text" / "prompt" / "messages" samples. See docs/data.md.
    tokenizer: str = ""
    max_seq_len: int = 1024  # longest sample (tokens) and Megatron micro-batch capacity
    global_batch_size: int = 16  # samples per optimizer step, across data-parallel ranks
    overlong: str = "error"  # what to do with a sample longer than max_seq_len: OVERLONG
    shuffle: bool = True
    seed: int = 1234
    # Pad every row (Megatron micro-batch or ChunkFlow chunk) to a multiple of this many
    # tokens, e.g. 8 or 64 for tensor-core friendly shapes; sequence parallelism also
    # pads to the tensor size. Padding carries no loss and no real token attends to it.
    pad_to_multiple: int = 1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Where training puts the token store it prepares from a JSONL data.path (one
    # subdirectory per input, tokenizer and store version); "" = .chunkflow_data_cache
    # next to train.output_dir (outside it).
    cache_dir: str = ""
    prepare_workers: int = 0  # tokenizer processes for that preparation; 0 = every core


@dataclass
class TrainConfig:
    steps: int = 40
    output_dir: str = "runs/tiny_cpu"
    schedule: str = "megatron"  # one of SCHEDULES
    # One of RECOMPUTE, mapped onto megatron-core's settings: none; selective = core
    # attention only; block = the first recompute_num_layers layers of every pipeline
    # stage, each checkpointed (recompute_method="block"); full = every layer (uniform).
    recompute: str = "none"
    recompute_num_layers: int = 1  # with recompute=block: layers per stage, 1..layers per stage
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 42
    log_every: int = 1
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    save_at_end: bool = True  # the end state as checkpoint_step<steps> (see docs/checkpoints.md)
    # After each successful save keep only the newest N complete checkpoints (0 = keep
    # all); the one just written and the one this run loaded are never deleted.
    keep_checkpoints: int = 0
    # Checkpoint directory to start from (model, optimizer, data and RNG state); "auto" =
    # the newest checkpoint under output_dir, or a fresh start when there is none (what a
    # requeued SLURM job wants).
    load: str = ""
    # Signals that ask for a checkpoint at the next step boundary and a clean exit (0);
    # a second signal exits at once. Empty = leave signals alone. See train/preemption.py.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    # A NaN/inf loss or gradient: "abort" (stop before anything non-finite is saved) or
    # "skip" (drop that update, count it; abort after max_skipped skips in a row).
    nonfinite: str = "abort"
    max_skipped: int = 10
    distributed_optimizer: bool = False
    # Start each gradient bucket's data-parallel reduction during the step's last
    # backward (megatron DDP's overlap_grad_reduce), instead of after it; buckets of
    # grad_bucket_params parameters (0 = megatron's default, max(4e7, 1e6 x DP)).
    overlap_grad_reduce: bool = True
    grad_bucket_params: int = 0
    # fp16 only: the dynamic loss scale's starting value (halved on overflow, the step
    # then skipped). megatron's own default, 2**32, skips ~30 steps before the first
    # update; 2**16 (torch's GradScaler default) starts training at once.
    initial_loss_scale: float = 65536.0
    # Write <output_dir>/timeline.json (per-stage compute intervals of the last step,
    # for scripts/plot_schedule.py --timeline); either schedule, any pipeline size.
    save_timeline: bool = False
    # Peak dense TFLOP/s of one GPU for the mfu of metrics.jsonl; 0 = look the device up
    # by name in chunkflow.train.metrics.PEAK_TFLOPS (bf16 tensor-core figures). On CPU,
    # or on a GPU the table does not know, mfu is null unless this is set.
    peak_tflops: float = 0.0
    # Per-rank memory in MiB that a step may use beyond weights, gradients and optimizer
    # state: saved activations, K/V state and the pipeline's cached inputs (the quantity
    # bench.memory_budget_mb budgets). Read by chunkflow.chunk_size/k = auto; 0 = on GPU
    # the device's free memory after the model is built minus a margin (docs/autotune.md),
    # on CPU an error (set it).
    memory_budget_mb: float = 0.0


@dataclass
class SpaCOConfig:
    """Sparse chunk-wise optimisation (chunkflow.mode=spaco); see docs/seco_spaco.md."""

    # t, the chunks of each long sample that are back-propagated: a whole number >= 1 is
    # a count (capped at the sample's k chunks), a value in (0, 1) a fraction of k.
    budget: float = 0.25
    # bernoulli: each chunk independently with probability t/k (unbiased gradient);
    # without_replacement: exactly t chunks (the paper's code; multi-hop terms biased
    # low by prod_{r=1..q} (1 - r/t)/(1 - r/k) for a q-hop term).
    sampler: str = "bernoulli"
    # Cap on the compensation factor k/t applied to a chosen chunk's loss and to every
    # K/V-gradient hand-off; 0 = no cap (unbiased). The paper's experiments use 2.
    max_factor: float = 0.0


@dataclass
class ChunkFlowConfig:
    chunk_size: IntOrAuto = 256  # C: tokens per chunk, or "auto" (train.memory_budget_mb)
    k: IntOrAuto = 1  # K: chunks of one long sample whose activations may be alive at once, or "auto"
    # With train.schedule=chunkflow: "chunkflow" (any K); "seco" = sequential chunk-wise
    # optimisation, K = 1 (exact; one chunk's activations alive per long sample); "spaco" =
    # seco that back-propagates only a sampled subset of each long sample's chunks
    # (chunkflow.spaco). Any pipeline size. Short samples (standalone chunks) always get a
    # backward.
    mode: str = "chunkflow"
    spaco: SpaCOConfig = field(default_factory=SpaCOConfig)
    # Keep each long sample's K/V state, its gradients and the cached pipeline inputs in
    # host memory (pinned on CUDA) and stream what a chunk needs, block by block: device
    # memory stops growing with the longest sample (docs/chunkflow.md, "Offload"). The
    # megatron schedule (e.g. a benchmark's baseline side) has no such state and ignores it.
    # The memory model of chunk_size/k = auto counts about one chunk's K/V per layer then.
    offload_kv: bool = False


@dataclass
class LoRAConfig:
    """Low-rank adapters (docs/lora.md): W x + (alpha / rank) B A dropout(x) on targets.

    Base weights are frozen and left out of the optimizer; only A and B train.
    """

    enabled: bool = False
    rank: int = 8  # r: inner dimension of A (r x in) and B (out x r)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (train mode only)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # of LORA_TARGETS
    seed: int = 0  # A's initialisation (B starts at zero); same on every rank
    # Adapter directory (adapter_model.safetensors + adapter_config.json, as written to
    # <checkpoint>/adapter) to start from; empty = fresh adapters. train.load still wins.
    load: str = ""


@dataclass
class BenchConfig:
    """``scripts/benchmark.py``: Megatron's stock schedule against ChunkFlow on the same
    model, batches, layout and memory budget (docs/benchmarks.md)."""

    # Per-rank activation-memory budget in MiB: peak bytes saved for backward (plus, for
    # ChunkFlow, the K/V prefixes, the K/V state store and the pipeline's recompute input
    # cache), max over ranks. Megatron takes the cheapest recompute that fits it; a side
    # that does not fit is reported as such. 0 = no budget.
    memory_budget_mb: float = 0.0
    # Optional cap on per-rank peak process memory in MiB (peak RSS on CPU, peak allocated
    # device memory on GPU) during a step; 0 = reported but not checked.
    peak_mem_budget_mb: float = 0.0
    warmup_steps: int = 1  # untimed global batches per side before timing (>= 1; they probe memory)
    timed_steps: int = 8  # timed global batches (the same ones, in the same order, for every side)
    # Sweep mode: global batches (after the warm-up, before the timed ones) on which the
    # fitting (C, K) points are timed to choose one; the timed batches then score it.
    selection_steps: int = 2
    # Per-batch speedups are summarised by their median and a seeded bootstrap 95%
    # interval of the median with this many resamples.
    bootstrap_resamples: int = 10000
    # Megatron's train.recompute: "auto" = probe none, selective, block:1..L-1 (L = layers
    # per stage) and full, run the fitting one with the fewest recompute FLOPs; or one of
    # RECOMPUTE to force it ("block" with train.recompute_num_layers).
    megatron_recompute: str = "auto"
    # Probe memory safely (candidates in order of growing memory; one that keeps all that
    # an over-budget one keeps, or whose predicted device peak exceeds the device, is not
    # run): "auto" = where an out-of-memory error could strand other ranks (a device other
    # than the CPU, more than one process); "always" / "never" force it (chunkflow/bench/probe.py).
    safe_probes: str = "auto"
    # Sweep ChunkFlow over sweep_chunk_sizes x sweep_k (else run chunkflow.chunk_size/k)
    # and compare Megatron with the fastest point that fits; also draws a PNG.
    sweep: bool = False
    sweep_chunk_sizes: list[int] = field(default_factory=list)  # empty = max_seq_len / 8, / 4, / 2
    sweep_k: list[int] = field(default_factory=lambda: [1, 2, 4])
    output: str = "runs/benchmark.json"  # the JSON report; the sweep PNG goes next to it (.png)


@dataclass
class LogConfig:
    """Where a run's per-step metrics go besides ``metrics.jsonl`` (docs/metrics.md).

    Both sinks are optional packages (``pip install -e '.[watch]'``), imported only when
    enabled; a missing one stops the run at start with the ``pip install`` that fixes it.
    """

    tensorboard: bool = False  # TensorBoard event files under <train.output_dir>/tensorboard
    # Weights & Biases project; empty = off. WANDB_MODE=offline keeps the run on disk
    # (<train.output_dir>/wandb) for a later `wandb sync`.
    wandb_project: str = ""
    wandb_run_name: str = ""  # the run's name in W&B; empty = W&B picks one


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    chunkflow: ChunkFlowConfig = field(default_factory=ChunkFlowConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    log: LogConfig = field(default_factory=LogConfig)
