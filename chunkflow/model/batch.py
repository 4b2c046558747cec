"""Turn a :class:`~chunkflow.data.types.PackedRow` into the tensors megatron's GPTModel
takes for one packed (THD) micro-batch.

Shapes (T = tokens in the row; the batch dimension is 1, as in megatron's THD path)::

    input_ids     (1, T) int64
    position_ids  (1, T) int64     restart at 0 per packed sample
    labels        (1, T) int64
    loss_mask     (1, T) float32
    packed_seq_params.cu_seqlens_q = cu_seqlens_kv  (num_samples + 1,) int32
    packed_seq_params.host_cu_seqlens   the same boundaries as a tuple of ints, and
    packed_seq_params.num_padding       padding tokens at the end (its last segment),
                                        so attention needs no device-to-host copy
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from chunkflow.data.types import PackedRow

__all__ = ["RowTensors", "row_to_tensors", "padded_length"]


@dataclass
class RowTensors:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    packed_seq_params: Optional[PackedSeqParams]
    num_tokens: int  # real tokens (without padding)
    num_loss_tokens: int
    num_padding: int = 0  # padding tokens appended at the end


def padded_length(num_tokens: int, multiple: int) -> int:
    """``num_tokens`` rounded up to a multiple of ``multiple`` (0 stays 0)."""
    return -(-num_tokens // multiple) * multiple


def row_to_tensors(row: PackedRow, device: torch.device, *, packed: bool = True,
                   pad_multiple: int = 1) -> RowTensors:
    """Tensors for one row; ``packed=False`` omits ``packed_seq_params`` (one sample).

    ``pad_multiple``: append P padding tokens so the row's length is a multiple of it
    (sequence parallelism splits the sequence across tensor ranks; GPU kernels like
    multiples of 8 or 64). Padding carries no loss (``loss_mask`` 0) and no real token
    attends to it: in a packed row it is a sample of its own, and in a dependent chunk
    it sits after the last real token, under the causal mask (only a sample's last chunk
    can be short, so no later chunk reads its K/V)::

        packed, P = 3:  a0 a1 b0 b1 b2 | p0 p1 p2    cu_seqlens [0, 2, 5, 8]
                        positions 0 1 0 1 2 | 0 1 2
    """
    n = len(row)
    pad = padded_length(n, pad_multiple) - n

    def t(a: np.ndarray, dtype: torch.dtype, fill: int = 0, tail: Optional[np.ndarray] = None) -> torch.Tensor:
        a = np.asarray(a)
        if pad:
            a = np.concatenate([a, tail if tail is not None else np.full(pad, fill, dtype=a.dtype)])
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)[None]

    psp = None
    cu_host = list(row.cu_seqlens)
    if packed:
        if pad:
            cu_host.append(n + pad)
        cu = torch.tensor(cu_host, dtype=torch.int32, device=device)
        max_len = int(np.diff(cu_host).max()) if len(cu_host) > 1 else 0
        psp = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )
        # Host copies for chunkflow.model.attention (read per layer without a sync).
        psp.host_cu_seqlens = tuple(int(x) for x in cu_host)
        psp.num_padding = pad
    last_pos = int(row.position_ids[-1]) + 1 if n else 0
    positions = np.arange(pad) if packed else np.arange(last_pos, last_pos + pad)
    return RowTensors(
        input_ids=t(row.input_ids, torch.long),
        position_ids=t(row.position_ids, torch.long, tail=positions),
        labels=t(row.labels, torch.long),
        loss_mask=t(row.loss_mask, torch.float32),
        packed_seq_params=psp,
        num_tokens=n,
        num_loss_tokens=row.num_loss_tokens,
        num_padding=pad,
    )
