"""Turn a :class:`~chunkflow.data.types.PackedRow` into the tensors megatron's GPTModel
takes for one packed (THD) micro-batch.

Shapes (T = tokens in the row; the batch dimension is 1, as in megatron's THD path)::

    input_ids     (1, T) int64
    position_ids  (1, T) int64     restart at 0 per packed sample
    labels        (1, T) int64
    loss_mask     (1, T) float32
    packed_seq_params.cu_seqlens_q = cu_seqlens_kv  (num_samples + 1,) int32
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from chunkflow.data.types import PackedRow

__all__ = ["RowTensors", "row_to_tensors"]


@dataclass
class RowTensors:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    packed_seq_params: Optional[PackedSeqParams]
    num_tokens: int
    num_loss_tokens: int


def row_to_tensors(row: PackedRow, device: torch.device, *, packed: bool = True) -> RowTensors:
    """Tensors for one row; ``packed=False`` omits ``packed_seq_params`` (one sample)."""

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)[None]

    psp = None
    if packed:
        cu = torch.from_numpy(np.asarray(row.cu_seqlens, dtype=np.int32)).to(device)
        max_len = int(np.diff(row.cu_seqlens).max()) if len(row.cu_seqlens) > 1 else 0
        psp = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )
    return RowTensors(
        input_ids=t(row.input_ids, torch.long),
        position_ids=t(row.position_ids, torch.long),
        labels=t(row.labels, torch.long),
        loss_mask=t(row.loss_mask, torch.float32),
        packed_seq_params=psp,
        num_tokens=len(row),
        num_loss_tokens=row.num_loss_tokens,
    )
