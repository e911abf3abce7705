"""Argument checks for the public ops: run before any kernel, each error
names the argument, what was expected and what was given."""
from __future__ import annotations


import torch
from torch import Tensor

from memkernels.ops.reference import default_scale

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
        return default_scale(head_dim)
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


def _like(x, name: str, ref: Tensor, ref_name: str, shape: tuple[int, ...], layout: str) -> None:
    """x: a floating tensor on ref's device, of `shape` (any float dtype: the backward casts)."""
    _tensor(x, name)
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")
    _shape(x, name, shape, layout)


def check_read_grads(dout, q, out, lse) -> None:
    """Validates read_bwd's incoming gradient and saved forward outputs (after check_read)."""
    _like(dout, "dout", q, "q", tuple(q.shape), "the shape of q [B, H, T, Dh]")
    _like(out, "out", q, "q", tuple(q.shape), "the shape of q [B, H, T, Dh]")
    _like(lse, "lse", q, "q", tuple(q.shape[:3]), "q's [B, H, T]")


def check_write_grads(dnew, mem, upd, lse) -> None:
    """Validates write_bwd's incoming gradient and saved forward outputs (after check_write)."""
    _like(dnew, "dnew", mem, "mem", tuple(mem.shape), "the shape of mem [B, H, S, Dh]")
    _like(upd, "upd", mem, "mem", tuple(mem.shape), "the shape of mem [B, H, S, Dh]")
    _like(lse, "lse", mem, "mem", tuple(mem.shape[:3]), "mem's [B, H, S]")


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


def _optional(x, name: str, expected: tuple[int, ...], layout: str, ref: Tensor,
              ref_name: str = "hidden") -> None:
    if x is None:
        return
    _same(_tensor(x, name), ref, name, ref_name)
    _shape(x, name, expected, layout)


def check_reading_layer(hidden, query_w, keys, values, out_w, eps, scale, key_scale, value_scale,
                        mlp_w, mlp_b, query_b, context, context_w, centroids, cluster_starts,
                        probes, check_values: bool = True, ref_name: str = "hidden") -> float:
    """Validates reading_layer's arguments; returns the resolved scale. With
    check_values=False, shapes and types only: not cluster_starts' values,
    whose check reads them to the host (a sync on a GPU). ref_name: what the
    messages call the tensor whose dtype and device the others must have
    (reading_layer_plan checks against a stand-in for hidden made from query_w)."""
    hidden = _tensor(hidden, "hidden")
    _rank(hidden, "hidden", (3,), "[B, T, C]")
    B, T, C = hidden.shape
    if C < 1:
        raise ValueError(f"hidden must have a hidden size C >= 1, got shape {tuple(hidden.shape)}")
    if not isinstance(keys, Tensor) or not isinstance(values, Tensor):
        raise TypeError(f"keys and values must be torch.Tensors, got {type(keys).__name__} and "
                        f"{type(values).__name__}")
    _rank(keys, "keys", (3, 4), "[Hk, S, Dh] (shared bank) or [B, Hk, S, Dh]")
    Hk, S, D = keys.shape[-3:]
    if Hk < 1 or S < 1:
        raise ValueError(f"keys must hold at least one head and one slot, got {tuple(keys.shape)}")
    _head_dim(D, "keys")
    if keys.dim() == 4:
        _shape(keys, "keys", (B, Hk, S, D), "[B, Hk, S, Dh] matching hidden's B")
    _shape(values, "values", tuple(keys.shape), "the shape of keys")
    if values.dtype != keys.dtype or values.device != keys.device:
        raise TypeError(f"values must have the dtype and device of keys ({keys.dtype}, "
                        f"{keys.device}), got ({values.dtype}, {values.device})")
    if keys.device != hidden.device:
        raise ValueError(f"keys must be on the device of {ref_name} ({hidden.device}), got "
                         f"{keys.device}")
    if keys.dtype == torch.int8:
        for name, s in (("key_scale", key_scale), ("value_scale", value_scale)):
            if not isinstance(s, Tensor) or s.dtype != torch.float32:
                raise TypeError(f"int8 keys/values need {name}, a float32 tensor (a scale per "
                                f"slot), got {s if s is None else s.dtype}")
            _shape(s, name, tuple(keys.shape[:-1]), "one scale per slot")
    elif key_scale is not None or value_scale is not None:
        raise ValueError("key_scale/value_scale go only with int8 keys/values")
    elif keys.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"keys must be a floating-point or int8 tensor, got {keys.dtype}")
    M = None
    if mlp_w is not None:
        _rank(_tensor(mlp_w, "mlp_w"), "mlp_w", (2,), "[M, C]")
        M = mlp_w.shape[0]
        _optional(mlp_w, "mlp_w", (M, C), "[M, C]", hidden, ref_name)
        if mlp_b is None:
            raise ValueError("mlp_w needs mlp_b ([M])")
        _optional(mlp_b, "mlp_b", (M,), "[M]", hidden, ref_name)
    elif mlp_b is not None or context is not None or context_w is not None:
        raise ValueError("mlp_b and context (with context_w) go only with mlp_w (an MLP query)")
    if (context is None) != (context_w is None):
        raise ValueError("context and context_w go together (the context and its first-layer "
                         "columns)")
    _optional(context, "context", (B, T, C), "[B, T, C], the shape of hidden", hidden, ref_name)
    _optional(context_w, "context_w", (M, C), "[M, C]", hidden, ref_name)
    _same(_tensor(query_w, "query_w"), hidden, "query_w", ref_name)
    _rank(query_w, "query_w", (2,), "[H * Dh, C] (or [H * Dh, M] after an MLP)")
    W = query_w.shape[0]
    if W < 1 or W % (Hk * D):
        raise ValueError(f"query_w must be [H * Dh, ...] with H a multiple of the keys' {Hk} "
                         f"heads of Dh = {D}, got {tuple(query_w.shape)}")
    _shape(query_w, "query_w", (W, C if M is None else M), "[H * Dh, C or M]")
    _optional(query_b, "query_b", (W,), "[H * Dh]", hidden, ref_name)
    _optional(out_w, "out_w", (W, C), "[H * Dh, C]", hidden, ref_name)
    if out_w is None:
        raise TypeError("out_w must be a torch.Tensor, got None")
    if centroids is not None or cluster_starts is not None or probes:
        if centroids is None or cluster_starts is None or not isinstance(probes, int) or probes < 1:
            raise ValueError("centroids, cluster_starts and probes >= 1 go together (an index)")
        if keys.dim() != 3:
            raise ValueError("an index (centroids) needs a bank shared by the batch: keys "
                             "[Hk, S, Dh]")
        _rank(_tensor(centroids, "centroids"), "centroids", (3,), "[Hk, clusters, Dh]")
        _optional(centroids, "centroids", (Hk, max(centroids.shape[1], 1), D),
                  "[Hk, clusters >= 1, Dh]", hidden, ref_name)
        clusters = centroids.shape[1]
        if (not isinstance(cluster_starts, Tensor) or cluster_starts.dtype != torch.int64
                or tuple(cluster_starts.shape) != (Hk, clusters + 1)):
            raise ValueError(f"cluster_starts must be int64 [Hk, clusters + 1] = "
                             f"{(Hk, clusters + 1)}")
        starts = cluster_starts.cpu() if check_values else None
        if starts is not None and (bool((starts[:, 0] != 0).any())
                                   or bool((starts[:, -1] != S).any())
                                   or bool((starts.diff(dim=1) < 0).any())):
            raise ValueError(f"cluster_starts must rise from 0 to the {S} slots in each row")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return _scale(scale, D)
