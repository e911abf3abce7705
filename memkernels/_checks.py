"""Argument checks for the public ops: run before any kernel, each error
names the argument, what was expected and what was given."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def _tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _rank(x: Tensor, name: str, ranks: tuple[int, ...], layout: str) -> None:
    if x.dim() not in ranks:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")


def _same(x: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def _shape(x: Tensor, name: str, expected: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must be {layout} = {tuple(expected)}, got {tuple(x.shape)}")


def _mask(mask, name: str, ref: Tensor, shapes: dict[tuple[int, ...], str]) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = valid), got {mask.dtype}")
    if mask.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {mask.device}")
    if tuple(mask.shape) not in shapes:
        want = " or ".join(f"{v} = {k}" for k, v in shapes.items())
        raise ValueError(f"{name} must be {want}, got {tuple(mask.shape)}")


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _head_dim(d: int, name: str) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{name} head dim must be in 1..{MAX_HEAD_DIM}, got {d}")


def check_read(q, k, v, scale, slot_mask) -> float:
    """Validates memory_read's arguments; returns the resolved scale."""
    q, k, v = _tensor(q, "q"), _tensor(k, "k"), _tensor(v, "v")
    _rank(q, "q", (4,), "[B, H, T, Dh]")
    _rank(k, "k", (3, 4), "[H, S, Dh] (shared bank) or [B, H, S, Dh] (one bank per sequence)")
    _same(k, q, "k", "q")
    _same(v, q, "v", "q")
    B, H, T, D = q.shape
    _head_dim(D, "q")
    S = k.shape[-2]
    if S < 1:
        raise ValueError(f"k must hold at least one slot (S >= 1), got shape {tuple(k.shape)}")
    if k.dim() == 3:
        _shape(k, "k", (H, S, D), "[H, S, Dh] matching q's H and Dh")
    else:
        _shape(k, "k", (B, H, S, D), "[B, H, S, Dh] matching q's B, H and Dh")
    _shape(v, "v", tuple(k.shape), "the shape of k")
    _mask(slot_mask, "slot_mask", q, {(S,): "[S]", (B, S): "[B, S]"})
    return _scale(scale, D)


def check_write(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, scale,
                token_mask) -> float:
    """Validates memory_write's arguments; returns the resolved scale."""
    mem = _tensor(mem, "mem")
    _rank(mem, "mem", (4,), "[B, H, S, Dh]")
    B, H, S, D = mem.shape
    _head_dim(D, "mem")
    if S < 1:
        raise ValueError(f"mem must hold at least one slot (S >= 1), got shape {tuple(mem.shape)}")
    named = {"q_slots": q_slots, "k_tok": k_tok, "v_tok": v_tok,
             "forget_logit": forget_logit, "input_logit": input_logit}
    for name, x in named.items():
        _same(_tensor(x, name), mem, name, "mem")
    _shape(q_slots, "q_slots", (B, H, S, D), "[B, H, S, Dh], the shape of mem")
    _rank(k_tok, "k_tok", (4,), "[B, H, T, Dh]")
    T = k_tok.shape[2]
    if T < 1:
        raise ValueError(f"k_tok must hold at least one token (T >= 1), got {tuple(k_tok.shape)}")
    _shape(k_tok, "k_tok", (B, H, T, D), "[B, H, T, Dh] matching mem's B, H and Dh")
    _shape(v_tok, "v_tok", (B, H, T, D), "[B, H, T, Dh], the shape of k_tok")
    for name in ("forget_logit", "input_logit"):
        g = named[name]
        if tuple(g.shape) not in ((B, H, S, 1), (B, H, S, D)):
            raise ValueError(f"{name} must be [B, H, S, 1] = {(B, H, S, 1)} or [B, H, S, Dh] = "
                             f"{(B, H, S, D)}, got {tuple(g.shape)}")
    if forget_logit.shape != input_logit.shape:
        raise ValueError(f"input_logit must have the shape of forget_logit "
                         f"{tuple(forget_logit.shape)}, got {tuple(input_logit.shape)}")
    _mask(token_mask, "token_mask", mem, {(B, T): "[B, T]"})
    return _scale(scale, D)
