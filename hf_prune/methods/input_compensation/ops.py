"""Input compensation: the pool math as pure tensor functions (no hooks, no models).

A compensation pool holds keys ``K`` [m, d_q] and values ``V`` [m, d_x]. For a query ``q`` (a token's input
embedding, or an image's pooled patch embedding) it returns

    a(q) = softmax(q̂ Kᵀ / τ)        q̂ = q / rms(q) when the query is normalised (our default)
    Δ(q) = a(q) V                     added to the model's input: x̃ = x + Δ(q)

in float32 whatever the model's dtype. ``V`` starts at zero, so Δ = 0 and training starts exactly from the
pruned model. When the query is a token's own input embedding, Δ depends on the token id only and can be
folded into the embedding table: E' = E + softmax(Ê Kᵀ / τ) V (``fold_into_table``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RMS_EPS = 1e-6


def rms_normalize(query: torch.Tensor) -> torch.Tensor:
    """``q / rms(q)`` over the last dimension (no learned scale), in float32."""
    q = query.to(torch.float32)
    return q * torch.rsqrt(q.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)


def pool_attention(query: torch.Tensor, keys: torch.Tensor, temperature: float,
                   normalize_query: bool = True) -> torch.Tensor:
    """Attention of each query over the pool's keys: ``softmax(q Kᵀ / τ)``, shape ``[..., m]``, float32."""
    q = rms_normalize(query) if normalize_query else query.to(torch.float32)
    return torch.softmax(q @ keys.to(torch.float32).t() / temperature, dim=-1)


def compensation(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, temperature: float,
                 normalize_query: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Δ, a)``: the compensation ``a(q) V`` ([..., d_x], float32) and the attention ``a(q)`` ([..., m])."""
    attn = pool_attention(query, keys, temperature, normalize_query)
    return attn @ values.to(torch.float32), attn


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each attention row; ``log m`` is uniform, 0 is collapse onto one pool entry."""
    a = attn.to(torch.float32)
    return -(a * torch.log(a.clamp_min(1e-30))).sum(dim=-1)


@torch.no_grad()
def fold_into_table(table: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, temperature: float,
                    normalize_query: bool = True, chunk_rows: int = 4096, scale: float = 1.0) -> torch.Tensor:
    """The embedding table with each row's compensation added, ``E + Δ(E)``, in the table's dtype.

    Row ``i`` gets exactly what the compensation hook adds to the embedding of token ``i`` (computed from the
    row in float32, cast to the table's dtype, then added), so the folded model's outputs equal the
    compensated model's. Rows are processed in chunks to bound memory on large vocabularies.

    ``scale``: an embedding module that returns ``scale * E[i]`` (Gemma multiplies by ``sqrt(hidden)``) gets
    ``E + Δ(scale * E) / scale``, so that its output ``scale * E[i] + Δ(scale * E[i])`` is what the hook gave.
    """
    out = torch.empty_like(table)
    for start in range(0, table.shape[0], chunk_rows):
        rows = table[start: start + chunk_rows]
        if scale == 1.0:
            delta, _ = compensation(rows, keys, values, temperature, normalize_query)
        else:
            delta, _ = compensation(rows * torch.tensor(scale, dtype=rows.dtype), keys, values, temperature,
                                    normalize_query)
            delta = delta / scale
        out[start: start + chunk_rows] = rows + delta.to(table.dtype)
    return out


INITIAL_LOGIT_STD = 8.0


def default_temperature(query_dim: int) -> float:
    """``sqrt(d_q) / 8``: with an RMS-normalised query and N(0, 1) keys the initial logits ``q̂·k / τ`` then have a
    standard deviation of 8 whatever ``d_q``, a sharp but not one-hot attention. The usual ``sqrt(d_q)`` (unit
    variance) leaves the attention near uniform, so the pool starts as one shared vector and trains slowly: on the
    toy LLaMAs of ``hf_prune.toy`` (d = 64 and 128, Magnitude 50%) τ with logit std 8-11 recovered the most held-out
    perplexity, ``sqrt(d_q)`` the least (see ``benchmarks/README.md``)."""
    return math.sqrt(query_dim) / INITIAL_LOGIT_STD


# ----------------------------------------------------------------------------------------------------
# losses against the dense teacher


def _masked_mean(per_item: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_item.mean()
    weights = mask.to(per_item.dtype)
    return (per_item * weights).sum() / weights.sum().clamp_min(1.0)


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T² · KL(p_teacher ‖ p_student)`` with ``p = softmax(logits / T)`` over the last dimension, averaged over
    every position (or the positions where ``mask`` is true: padding never counts), in float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; the teacher must be the dense version of "
                         "the same model.")
    log_s = F.log_softmax(student_logits.to(torch.float32) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(torch.float32) / temperature, dim=-1)
    per_item = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return _masked_mean(per_item, mask) * temperature ** 2


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the feature dimension, averaged over every position (or those where ``mask``
    is true), in float32."""
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
                         "differ in shape; the teacher must be the dense version of the same model.")
    diff = (student.to(torch.float32) - teacher.to(torch.float32)).pow(2)
    per_item = diff.mean(dim=-1) if diff.dim() > 1 else diff
    return _masked_mean(per_item, mask)


# ----------------------------------------------------------------------------------------------------
# overhead accounting


def pool_parameters(pool_size: int, query_dim: int, value_dim: int) -> int:
    """Parameters of the pool: ``m · (d_q + d_x)``."""
    return pool_size * (query_dim + value_dim)


def pool_flops(pool_size: int, query_dim: int, value_dim: int, normalize_query: bool = True) -> int:
    """Floating-point operations for one query (a multiply-add counts 2): scores ``2·m·d_q``, softmax ``~4·m``
    (max, subtract, exp, normalise), mix ``2·m·d_x``, plus ``3·d_q`` for the RMS normalisation, plus the
    addition ``d_x`` of the compensation to the input."""
    flops = 2 * pool_size * query_dim + 4 * pool_size + 2 * pool_size * value_dim + value_dim
    return flops + (3 * query_dim if normalize_query else 0)


def conv2d_flops(conv: torch.nn.Conv2d, height: int, width: int) -> int:
    """Multiply-add FLOPs (x2) of one image through a ``Conv2d`` (the extra query pass of pixel compensation)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    out_h = (height + 2 * ph - kh) // sh + 1
    out_w = (width + 2 * pw - kw) // sw + 1
    per_output = 2 * (conv.in_channels // conv.groups) * kh * kw + (1 if conv.bias is not None else 0)
    return per_output * conv.out_channels * out_h * out_w
