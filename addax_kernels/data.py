"""Addax's length assignment: long examples to the zeroth-order batch, short ones to the
first-order batch, so backpropagation (whose activation memory grows with sequence length)
only ever sees short sequences."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ._numbers import is_integer, is_real_number

__all__ = ["split_by_length", "sequence_lengths"]


def _batch_size_and_width(batch: Mapping[str, Any]) -> Tuple[int, int]:
    for key in ("attention_mask", "input_ids"):
        value = batch.get(key)
        if value is not None:
            if not isinstance(value, torch.Tensor) or value.dim() != 2:
                raise ValueError(f"batch[{key!r}] must be a 2-D tensor [batch, seq], got "
                                 f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))}")
            return int(value.shape[0]), int(value.shape[1])
    raise ValueError("batch needs 'attention_mask' or 'input_ids' to tell sequence lengths")


def sequence_lengths(batch: Mapping[str, Any], pad_token_id: Optional[int] = None) -> torch.Tensor:
    """Real tokens per example: ``attention_mask.sum(-1)``; without a mask, the count of
    ``input_ids != pad_token_id``; without either, the full width (an unpadded batch)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping (an HF-style dict batch), got {type(batch).__name__}")
    size, width = _batch_size_and_width(batch)
    mask = batch.get("attention_mask")
    if mask is not None:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"batch['attention_mask'] must hold integers or bools, got {mask.dtype}")
        return (mask != 0).sum(-1)
    input_ids = batch["input_ids"]
    if pad_token_id is not None:
        if not is_integer(pad_token_id):
            raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
        return (input_ids != pad_token_id).sum(-1)
    return torch.full((size,), width, dtype=torch.int64, device=input_ids.device)


def _token_mask(batch: Mapping[str, Any], pad_token_id: Optional[int]) -> Optional[torch.Tensor]:
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"] != 0
    if pad_token_id is not None:
        return batch["input_ids"] != pad_token_id
    return None


def _select(batch: Mapping[str, Any], rows: torch.Tensor) -> Dict[str, Any]:
    """The examples at ``rows`` (a CPU int64 index) of every per-example value."""
    out: Dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            out[key] = value.index_select(0, rows.to(value.device))
        elif isinstance(value, (list, tuple)):
            out[key] = type(value)(value[i] for i in rows.tolist())
        else:
            out[key] = value  # shared across examples (a 0-dim tensor, a flag, a string)
    return out


def _decoder_side(key: str, encoder_decoder: bool) -> bool:
    """Whether ``key`` holds the decoder's sequence, whose columns the encoder's mask does not describe."""
    return key.startswith("decoder_") or (encoder_decoder and key == "labels")


def _trim(side: Dict[str, Any], width: int, token_mask: torch.Tensor, encoder_decoder: bool) -> Dict[str, Any]:
    """Drop the leading and trailing columns that are padding in every example of ``side``."""
    columns = token_mask.any(0).nonzero().flatten()
    if columns.numel() == 0:
        return side
    first, last = int(columns[0]), int(columns[-1]) + 1
    if first == 0 and last == width:
        return side
    for key, value in side.items():
        if (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == width
                and not _decoder_side(key, encoder_decoder)):
            side[key] = value[:, first:last]
    return side


def split_by_length(
    batch: Mapping[str, Any],
    threshold: float,
    *,
    trim_padding: bool = False,
    pad_token_id: Optional[int] = None,
    encoder_decoder: bool = False,
) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """Split an HF-style batch into (zo_batch, fo_batch) by sequence length (Addax, §3).

    Examples with more than ``threshold`` real tokens (see :func:`sequence_lengths`) go to the
    ZO batch B0, the others to the FO batch B1; either side is None when it has no examples.
    Every tensor with a leading batch dimension and every list/tuple of per-example values is
    split; other values (0-dim tensors, flags, strings) are passed to both sides unchanged.
    Order within each side is preserved.

    With ``trim_padding=True``, leading/trailing columns that are padding for every example of
    a side are removed from every tensor whose second dimension is the sequence length
    (input_ids, attention_mask, labels, token_type_ids, ...).  Only the edges are trimmed, so
    left and right padding both work and positions inside the kept span never shift.  The
    decoder's tensors of an encoder–decoder batch are never trimmed (their length is not the
    encoder's, even where the widths happen to agree): keys starting with ``decoder_`` always,
    and ``labels`` with ``encoder_decoder=True`` (pass ``model.config.is_encoder_decoder``).

    Deciding the split reads the lengths on the host: pass a CPU batch (as a DataLoader yields
    it) to avoid a device sync.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping (an HF-style dict batch), got {type(batch).__name__}")
    if not is_real_number(threshold) or not math.isfinite(threshold):
        raise TypeError(f"threshold must be a finite number of tokens, got {threshold!r}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    for name, flag in (("trim_padding", trim_padding), ("encoder_decoder", encoder_decoder)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    size, width = _batch_size_and_width(batch)
    if pad_token_id is not None and not is_integer(pad_token_id):
        raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] != size:
            raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows but the batch has {size} examples")
        if isinstance(value, (list, tuple)) and len(value) != size:
            raise ValueError(f"batch[{key!r}] has {len(value)} entries but the batch has {size} examples")

    lengths = sequence_lengths(batch, pad_token_id).cpu()
    is_long = lengths > threshold
    token_mask = _token_mask(batch, pad_token_id)
    sides = []
    for selected in (is_long, ~is_long):
        rows = selected.nonzero().flatten()
        if rows.numel() == 0:
            sides.append(None)
            continue
        side = _select(batch, rows)
        if trim_padding and token_mask is not None:
            side = _trim(side, width, token_mask.index_select(0, rows.to(token_mask.device)).cpu(),
                         encoder_decoder)
        sides.append(side)
    return sides[0], sides[1]
