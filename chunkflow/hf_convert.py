"""Hugging Face directory <-> chunkflow checkpoint, one tensor at a time.

``import_hf`` writes the layout chunkflow's trainer loads with ``train.load=<out>``::

    <out>/model/        megatron dist_checkpointing shards for the TP x PP layout
    <out>/trainer.json  {"step": 0, "model_only": true, "config": {...}, "hf": {...}}
    <out>/hf/           config.json and tokenizer files of the source (for export)

One process per rank of the layout (spawned here) builds its stage of the model on the
``meta`` device (no memory), reads only its slices of the safetensors files, and puts
each converted piece in a memory-mapped scratch file, so the pieces live in the page
cache (which the kernel can write back and evict) rather than in process memory while
megatron writes the checkpoint. Anonymous memory stays near one tensor.

``export_hf`` reads a checkpoint of any layout (megatron's format stores every tensor
with its global shape) one full-model parameter at a time, through
``torch.distributed.checkpoint`` with a planner that asks for exactly that parameter's
region, splits it into Hugging Face tensors and streams them into safetensors files.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp

from chunkflow.config.errors import UserError
from chunkflow.config.loader import config_to_dict
from chunkflow.config.schema import DTYPES, Config, ModelConfig
from chunkflow.model.hf import (
    DTYPE_NAMES, TOKENIZER_FILES, HFError, check_hf_tensors, check_parallel_sizes, hf_config_from_model,
    hf_dtype, hf_specs, megatron_params, model_config_from_dict, model_fields_from_hf, param_map,
    read_hf_config, read_shard, to_hf,
)
from chunkflow.model.safetensors_stream import SafetensorsReader, SafetensorsWriter
from chunkflow.model.state import global_name
from chunkflow.train.progress import ItemProgress

__all__ = ["import_hf", "import_rank", "export_hf", "export_hf_standalone", "layout_config", "CHECKPOINT_HF_DIR"]

CHECKPOINT_HF_DIR = "hf"  # <checkpoint>/hf: the source's config.json and tokenizer files


def layout_config(hf_dir: str | Path, *, tensor: int = 1, pipeline: int = 1, dtype: Optional[str] = None) -> Config:
    """A validated config for ``hf_dir``'s model in a TP x PP layout (dtype: the source's)."""
    from chunkflow.config.validate import validate_config, validate_layout

    hf = read_hf_config(hf_dir)
    cfg = Config()
    for key, value in model_fields_from_hf(hf).items():
        setattr(cfg.model, key, value)
    cfg.model.dtype = dtype or hf_dtype(hf) or "fp32"
    cfg.parallel.tensor, cfg.parallel.pipeline = tensor, pipeline
    cfg.data.global_batch_size = 1
    validate_config(cfg)
    validate_layout(cfg, tensor * pipeline)
    check_parallel_sizes(cfg.model, tensor)
    return cfg


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("config.json",) + TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def _meta_device() -> Iterator[None]:
    """Build megatron modules on the ``meta`` device (shapes, names, no storage).

    With tied embeddings and PP > 1 megatron copies the first stage's embedding to the
    last stage at construction (``.cuda()`` + all-reduce), which has no meaning for
    storage-less tensors; that step is skipped on every rank alike (megatron-core 0.19
    skips it itself under ``init_model_with_meta_device``).
    """
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule._is_in_embd_group
    LanguageModule._is_in_embd_group = lambda self: False  # type: ignore[method-assign]
    try:
        with torch.device("meta"):
            yield
    finally:
        LanguageModule._is_in_embd_group = original  # type: ignore[method-assign]


def _return_freed_memory_to_os() -> None:
    """Make glibc serve allocations >= 1 MiB with their own mappings, freed at once.

    By default glibc raises its mmap threshold after large frees, after which tensors
    of one conversion step come from the heap and the heap only grows: converting tensor
    by tensor then looked like holding every tensor (measured: +530 MiB over 170
    tensors). No-op where glibc's ``mallopt`` is not available.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; a fixed value also stops the adjustment
    except (OSError, AttributeError):
        pass


def _mmap_copy(t: torch.Tensor, path: Path) -> torch.Tensor:
    """``t`` copied into a shared file mapping: its pages belong to the page cache."""
    mapped = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
    mapped.copy_(t)
    return mapped


# --------------------------------------------------------------------------- import
def import_rank(hf_dir: str | Path, out: str | Path, cfg: Config, *, progress: bool = False) -> None:
    """Run on every rank of ``cfg``'s layout (process groups not yet created).
    ``progress``: rank 0 shows its tensors and bytes converted, elapsed and ETA."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from chunkflow.model.state import layer_offset
    from chunkflow.model.provider import build_model
    from chunkflow.parallel.distributed import init_distributed

    _return_freed_memory_to_os()
    ctx = init_distributed(cfg)
    m, out = cfg.model, Path(out)
    with _meta_device():
        model = build_model(cfg, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage)
    reader = SafetensorsReader(hf_dir)
    check_hf_tensors(reader, m)
    scratch = out / f".import_scratch_rank{ctx.rank}"
    scratch.mkdir(parents=True, exist_ok=True)
    offset = layer_offset(model)
    sd = model.sharded_state_dict(prefix="")
    keys = [k for k in sd if not isinstance(sd[k], ShardedObject)]
    shown = ItemProgress(len(keys), "tensors", label=f"import (rank 0 of {ctx.world_size})",
                         total_bytes=sum(sd[k].data.nbytes for k in keys),
                         stream=sys.stdout if progress and ctx.rank == 0 else None)
    for key in keys:
        entry = sd[key]
        nbytes = entry.data.nbytes
        pm = param_map(global_name(key, offset), m)
        piece = read_shard(reader, pm, m, ctx.tp_rank, ctx.tp_size).to(entry.data.dtype)
        if tuple(piece.shape) != tuple(entry.data.shape):
            raise HFError(f"'{pm.name}' from {pm.sources}: expected shape {tuple(entry.data.shape)} "
                          f"on rank {ctx.rank}, got {tuple(piece.shape)}")
        if isinstance(entry, ShardedTensorFactory):
            # Build the factory's pieces (e.g. gate / up halves) now, each in its own
            # mapping: megatron would otherwise clone these views in process memory.
            entry.data = piece
            built = entry.build()
            for i, st in enumerate(built):
                st.data = _mmap_copy(st.data, scratch / f"{key}.{i}")
            sd[key] = built
            del entry, built, st, piece
            gc.collect()  # the factory sits in reference cycles that would keep `piece`
        else:
            assert isinstance(entry, ShardedTensor), type(entry)
            entry.data = _mmap_copy(piece, scratch / key)
            del piece
        shown.advance(nbytes=nbytes)
    reader.close()
    shown.finish("read, now writing megatron's checkpoint")
    if ctx.rank == 0:
        (out / "model").mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": sd}, str(out / "model"))
    torch.distributed.barrier()
    if ctx.rank == 0:
        files = _copy_side_files(Path(hf_dir), out / CHECKPOINT_HF_DIR)
        state = {"step": 0, "model_only": True, "config": config_to_dict(cfg),
                 "hf": {"source": str(Path(hf_dir).resolve()), "files": files}}
        (out / "trainer.json").write_text(json.dumps(state, indent=1))
    # No rank returns before the checkpoint is complete: a caller that goes on to load it
    # (same process group) must not read hf/config.json while rank 0 is writing it.
    torch.distributed.barrier()
    del sd
    shutil.rmtree(scratch, ignore_errors=True)
    torch.distributed.barrier()
    if ctx.rank == 0:  # last, over the finished files: loading verifies it (train/checkpoint.py)
        from chunkflow.train.checkpoint_files import write_manifest

        write_manifest(out)
    torch.distributed.barrier()


def _import_worker(rank: int, world: int, hf_dir: str, out: str, cfg: Config, progress: bool = False) -> None:
    import multiprocessing
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    # megatron's checkpoint writer starts helper processes, which a daemonic process
    # (as run_distributed's ranks are) may not; this rank is joined by its parent anyway.
    multiprocessing.current_process().daemon = False
    from chunkflow.parallel.distributed import destroy_distributed

    try:
        import_rank(hf_dir, out, cfg, progress=progress)
    finally:
        destroy_distributed()


def import_hf(hf_dir: str | Path, out: str | Path, *, tensor: int = 1, pipeline: int = 1,
              dtype: Optional[str] = None, timeout_s: float = 3600, progress: bool = False) -> Path:
    """Convert ``hf_dir`` into a chunkflow checkpoint at ``out`` for a TP x PP layout.

    Spawns ``tensor * pipeline`` local processes (gloo). ``dtype`` (fp32, bf16, ...)
    defaults to the source's ``config.json`` dtype. ``progress``: rank 0 prints its
    tensors and bytes converted with elapsed time and ETA (chunkflow.train.progress).
    Returns ``out``.
    """
    from chunkflow.parallel.spawn import run_distributed

    cfg = layout_config(hf_dir, tensor=tensor, pipeline=pipeline, dtype=dtype)
    check_hf_tensors(SafetensorsReader(hf_dir), cfg.model)  # fail here rather than in every rank
    run_distributed(_import_worker, tensor * pipeline, (str(hf_dir), str(out), cfg, progress), timeout_s=timeout_s)
    return Path(out)


# --------------------------------------------------------------------------- export
class _RegionPlanner(dcp.LoadPlanner):
    """Loads chosen regions of checkpoint tensors into given destination tensors.

    ``requests``: ``(key, global offsets, destination)``; the destination's shape is the
    region's size. Only storage chunks overlapping a region are read.
    """

    def __init__(self, requests: list[tuple[str, tuple[int, ...], torch.Tensor]]):
        self.requests = requests
        self._dest = {(key, tuple(off)): dest for key, off, dest in requests}

    def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> Any:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items = []
        for key, offsets, dest in self.requests:
            md = self.metadata.state_dict_metadata.get(key)
            if md is None:
                raise HFError(f"checkpoint has no tensor '{key}'")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, md, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list) -> list:
        return global_plan

    def finish_plan(self, central_plan: Any) -> Any:
        return central_plan

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise AssertionError("no byte items are requested")

    def resolve_tensor(self, read_item: Any) -> torch.Tensor:
        dest = self._dest[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
        pass


def _stored_dtype(metadata: Any, key: str) -> torch.dtype:
    md = metadata.state_dict_metadata.get(key)
    if md is None:
        raise HFError(f"checkpoint has no tensor '{key}'")
    return md.properties.dtype


def _read_full(entry: Any, reader: Any, metadata: Any) -> torch.Tensor:
    """The full-model tensor behind one entry of a TP=1/PP=1 sharded state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    dest = torch.empty(tuple(entry.data.shape), dtype=_stored_dtype(metadata, entry.key))
    if isinstance(entry, ShardedTensorFactory):
        entry.data = dest
        pieces = entry.build()
    else:
        entry.data = dest
        pieces = [entry]
    requests = [(st.key, tuple(st.global_offset), st.data.view((1,) * st.prepend_axis_num + tuple(st.local_shape)))
                for st in pieces]
    dcp.load({}, storage_reader=reader, planner=_RegionPlanner(requests), no_dist=True)
    return dest


def _find_hf_source(ckpt: Path, state: dict) -> Optional[Path]:
    """Where the source config.json / tokenizer live: <ckpt>/hf, else model.hf_dir."""
    candidates = [ckpt / CHECKPOINT_HF_DIR, Path(state.get("config", {}).get("model", {}).get("hf_dir") or "")]
    for c in candidates:
        if str(c) not in ("", ".") and (c / "config.json").is_file():
            return c
    return None


def _read_adapters(ckpt: Path) -> Optional[tuple[dict, dict]]:
    """LoRA adapters saved beside the checkpoint (``<ckpt>/adapter``), if any."""
    from chunkflow.model.lora import ADAPTER_CONFIG, ADAPTER_FILE

    path = ckpt / "adapter"
    if not (path / ADAPTER_FILE).is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path / ADAPTER_FILE)), json.loads((path / ADAPTER_CONFIG).read_text())


def _merge_adapters(name: str, full: torch.Tensor, adapters: Optional[tuple[dict, dict]],
                    m: ModelConfig) -> torch.Tensor:
    """``full`` with this weight's LoRA delta folded in (exports are merged models)."""
    if adapters is None or not name.endswith(".weight"):
        return full
    from chunkflow.model.lora import merge_full_state

    tensors, acfg = adapters
    layer = name[: -len(".weight")]
    mine = {k: v for k, v in tensors.items() if k.rsplit(".", 2)[0] == layer}
    if not mine:
        return full
    merged = merge_full_state({name: full}, mine, num_attention_heads=m.num_attention_heads,
                              num_query_groups=m.num_query_groups, alpha=acfg["alpha"], rank=acfg["rank"])
    return merged[name]


def export_hf(ckpt: str | Path, out_dir: str | Path, *, dtype: Optional[str] = None,
              max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> list[str]:
    """Write ``ckpt`` (a chunkflow checkpoint of any layout) as a Hugging Face directory.

    LoRA adapters saved with the checkpoint (``<ckpt>/adapter``) are merged into the
    exported weights.

    Needs a world-size-1 process group (``init_distributed``) for megatron to describe
    the full model. ``dtype`` defaults to the source config's, else the checkpoint's.
    ``progress``: print parameters and bytes written, elapsed and ETA. Returns the
    safetensors file names.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from chunkflow.model.provider import build_model
    from chunkflow.train.checkpoint import read_trainer_state, verify_checkpoint
    from chunkflow.train.checkpoint_files import SafeFileSystemReader, write_text_atomic

    _return_freed_memory_to_os()
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    verify_checkpoint(ckpt, collective=False)  # manifest hashes: refuses a torn or corrupt checkpoint by name
    state = read_trainer_state(ckpt)
    meta_file = ckpt / "model" / "metadata.json"
    backend = json.loads(meta_file.read_text()).get("sharded_backend") if meta_file.is_file() else None
    if backend != "torch_dist":
        raise HFError(f"{ckpt}/model: expected a megatron torch_dist checkpoint, found backend {backend!r}")
    saved = state["config"]
    m: ModelConfig = model_config_from_dict(saved["model"])
    source = _find_hf_source(ckpt, state)
    base = read_hf_config(source) if source else None
    out_dtype = dtype or (hf_dtype(base) if base else None) or m.dtype
    cfg = Config()
    cfg.model = model_config_from_dict(saved["model"])
    cfg.model.hf_dir = ""
    with _meta_device():
        model = build_model(cfg, pre_process=True, post_process=True)
    sd = {k: v for k, v in model.sharded_state_dict(prefix="").items() if not isinstance(v, ShardedObject)}
    reader = SafeFileSystemReader(ckpt / "model")  # .metadata through an allow-list, never plain pickle
    metadata = reader.read_metadata()
    torch_dtype = getattr(torch, DTYPE_NAMES[out_dtype])
    writer = SafetensorsWriter(out_dir, hf_specs(m, torch_dtype), max_shard_bytes=max_shard_bytes)
    adapters = _read_adapters(ckpt)
    params = megatron_params(m)
    shown = ItemProgress(len(params), "parameters", label="export", stream=sys.stdout if progress else None,
                         total_bytes=sum(spec.num_bytes for spec in hf_specs(m, torch_dtype)))
    try:
        for pm in params:
            full = _read_full(sd.pop(pm.name), reader, metadata)
            full = _merge_adapters(pm.name, full, adapters, m)
            nbytes = 0
            for name, tensor in to_hf(pm, full, m):
                writer.write(name, tensor.to(torch_dtype))
                nbytes += tensor.numel() * torch_dtype.itemsize
            del full
            shown.advance(nbytes=nbytes)
        files = writer.close()  # every shard renamed into place
        shown.finish(f"into {len(files)} safetensors file{'s' if len(files) != 1 else ''}")
    except BaseException:
        writer.abort()  # an earlier export in out_dir stays whole
        raise
    if source:
        _copy_side_files(source, out_dir)
    elif saved.get("data", {}).get("tokenizer"):
        # data.tokenizer is a tokenizer directory (its chat template and special tokens
        # travel with it) or a bare tokenizer.json.
        tok = Path(saved["data"]["tokenizer"])
        if tok.is_dir():
            for name in TOKENIZER_FILES:  # config.json is written below, from the model
                if (tok / name).is_file():
                    shutil.copyfile(tok / name, out_dir / name)
        elif tok.is_file():
            shutil.copyfile(tok, out_dir / "tokenizer.json")
    config = hf_config_from_model(m, base, out_dtype, saved.get("data", {}).get("max_seq_len", 4096))
    write_text_atomic(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return files


def export_hf_standalone(ckpt: str | Path, out_dir: str | Path, **kwargs: Any) -> list[str]:
    """:func:`export_hf` in this process with its own world-size-1 process group."""
    from chunkflow.parallel.distributed import destroy_distributed, init_distributed
    from chunkflow.parallel.spawn import free_port

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {key: os.environ.get(key) for key in keys}
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        init_distributed(Config())
        try:
            return export_hf(ckpt, out_dir, **kwargs)
        finally:
            destroy_distributed()
    finally:  # the caller's environment as it was: a later launch must not inherit a rendezvous
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_CLI_DOC = """Convert between Hugging Face model directories and chunkflow checkpoints.

    chunkflow-convert import --hf-dir D --out O [--tensor N --pipeline M] [--dtype bf16]
    chunkflow-convert export --ckpt O --hf-dir D2 [--dtype bf16] [--max-shard-gb 5]

(or python scripts/convert_hf.py ...). ``import`` writes ``O/model`` (megatron
dist_checkpointing, sharded for N x M; train with ``train.load=O``), ``O/trainer.json``
and ``O/hf`` (config and tokenizer files). ``export`` reads a chunkflow checkpoint of any
layout (an import, or a training run's ``checkpoint_step<N>``) and writes safetensors,
config.json and tokenizer files that ``transformers.AutoModelForCausalLM.from_pretrained``
loads. See docs/hf.md.
"""


def main(argv: Optional[list[str]] = None) -> int:
    """The command line of ``chunkflow-convert`` / ``scripts/convert_hf.py``; exit code."""
    parser = argparse.ArgumentParser(description=_CLI_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> chunkflow checkpoint")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--out", required=True)
    imp.add_argument("--tensor", type=int, default=1)
    imp.add_argument("--pipeline", type=int, default=1)
    imp.add_argument("--dtype", choices=DTYPES, help="default: the dtype in config.json")
    exp = sub.add_parser("export", help="chunkflow checkpoint -> Hugging Face directory")
    exp.add_argument("--ckpt", required=True)
    exp.add_argument("--hf-dir", required=True)
    exp.add_argument("--dtype", choices=DTYPES, help="default: the source model's dtype")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors file size")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            out = import_hf(args.hf_dir, args.out, tensor=args.tensor, pipeline=args.pipeline, dtype=args.dtype,
                            progress=True)
            print(f"wrote {out} (tensor={args.tensor}, pipeline={args.pipeline}); train with train.load={out}")
        else:
            files = export_hf_standalone(args.ckpt, args.hf_dir, dtype=args.dtype,
                                         max_shard_bytes=int(args.max_shard_gb * 2**30), progress=True)
            print(f"wrote {args.hf_dir}: {', '.join(files)}")
    except (UserError, FileNotFoundError) as e:  # HFError, ConfigError, CheckpointError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
