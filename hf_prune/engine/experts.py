"""Mixture-of-experts layers as transformers 5 stores them: one module (``MixtralExperts``, ``Qwen3MoeExperts``,
``DeepseekV3Experts``, ...) holding every expert's weights fused in two 3-D parameters, ``gate_up_proj``
``[experts, 2 * intermediate, hidden]`` and ``down_proj`` ``[experts, hidden, intermediate]``, and computing, for the
tokens the router sends expert ``e``: ``gate, up = (x @ gate_up_proj[e].T).chunk(2); y = (act(gate) * up) @
down_proj[e].T``.

Each expert's projection is pruned as the Linear it is (``ExpertSlice``: its ``[out, in]`` weight is a view into
the fused parameter, so the model keeps, and saves, the stock fused layout), with statistics from the tokens the
router actually sends that expert (``ExpertStatsCollector``). An expert routed fewer than ``min_tokens`` tokens is
calibrated on every token of the batch instead, and the report says so per expert; ``mode="all_tokens"`` does that
for every expert. The router (``gate``) is never a target.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .stats import LinearStats

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
MODES = ("routed", "all_tokens")


def is_experts(module: nn.Module) -> bool:
    """A fused experts module of the stock transformers 5 layout (see the module docstring)."""
    gate_up, down = (getattr(module, n, None) for n in EXPERT_PARAMS)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not callable(getattr(module, "act_fn", None)):
        return False
    experts, double, hidden = gate_up.shape
    return down.shape == (experts, hidden, double // 2) and double % 2 == 0


class ExpertSlice:
    """One expert's ``gate_up_proj`` or ``down_proj`` inside a fused experts module, seen as a Linear layer:
    ``weight`` is the ``[out, in]`` view of that expert's slice (writing it writes the fused parameter)."""

    bias = None

    def __init__(self, owner: nn.Module, param: str, expert: int):
        self.owner, self.param, self.expert = owner, param, expert
        self.report_info: dict = {}

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.param)[self.expert]

    @property
    def in_features(self) -> int:
        return int(getattr(self.owner, self.param).shape[2])

    @property
    def out_features(self) -> int:
        return int(getattr(self.owner, self.param).shape[1])

    def __repr__(self) -> str:
        return f"ExpertSlice({type(self.owner).__name__}.{self.param}[{self.expert}])"


def expert_slices(block: nn.Module, prefix: str) -> list[tuple[str, ExpertSlice]]:
    """``(name, slice)`` of every expert projection of the fused experts modules in ``block`` (``prefix``: the
    block's name): ``<experts module>.<expert>.gate_up_proj`` and ``....down_proj``."""
    found = []
    for name, module in block.named_modules(prefix=prefix):
        if is_experts(module):
            for expert in range(module.gate_up_proj.shape[0]):
                found += [(f"{name}.{expert}.{param}", ExpertSlice(module, param, expert)) for param in EXPERT_PARAMS]
    return found


def is_router(name: str, module: nn.Module, parent: nn.Module) -> bool:
    """A Linear that routes tokens between experts (Qwen2-MoE's ``shared_expert_gate``, a ``gate``/``router``
    Linear next to an experts module): left alone, like the routers of their own classes."""
    leaf = name.rsplit(".", 1)[-1]
    return (leaf in ("gate", "router") or leaf.endswith("_gate")) and any(is_experts(m) for m in parent.children())


def _expert_inputs(owner: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index")
    values = list(args[:2]) + [kwargs.get(n) for n in names[len(args[:2]):]]
    if any(v is None for v in values) or values[1].dim() != 2:
        raise UnsupportedModelError(
            f"{type(owner).__name__} was not called as (hidden_states, top_k_index, top_k_weights), the stock "
            "transformers experts layout hf_prune prunes per expert; exclude its parameters or register a family.")
    return values[0], values[1]


class ExpertStatsCollector:
    """Forward hooks on fused experts modules that accumulate, per expert, the input statistics of its
    ``gate_up_proj`` (the tokens routed to it) and of its ``down_proj`` (``act(gate) * up`` of those tokens), for the
    duration of a ``with`` block. ``experts``: ``{None: all of them}`` or the set of experts to collect (the ones
    recalibrated on all tokens); ``mode``: ``"routed"`` or ``"all_tokens"``.

    The first call checks that the module computes what the stock layout says (its output equals the routed
    per-expert sum recomputed here); anything else is refused before a weight changes."""

    def __init__(self, slices: dict[str, tuple[ExpertSlice, frozenset]], dtype: torch.dtype = torch.float32, *,
                 mode: str = "routed", experts: set[str] | None = None):
        self.mode, self.dtype = mode, dtype
        self.token_mask: torch.Tensor | None = None
        self.stats: dict[str, LinearStats] = {}
        self.routed: dict[str, int] = {}
        self.owners: dict[int, tuple[nn.Module, dict[int, dict[str, str]]]] = {}
        for name, (piece, kinds) in slices.items():
            if experts is not None and name not in experts:
                continue
            self.stats[name] = LinearStats(piece.in_features, frozenset(kinds), dtype)
            self.routed[name] = 0
            owner, table = self.owners.setdefault(id(piece.owner), (piece.owner, {}))
            table.setdefault(piece.expert, {})[piece.param] = name
        self._handles: list = []
        self._checked: set[int] = set()

    def _hook(self, owner: nn.Module, table: dict[int, dict[str, str]]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            hidden, index = _expert_inputs(module, args, kwargs)
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            real = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            mask = self.token_mask
            if mask is not None and mask.numel() == hidden.shape[0]:
                real = mask.reshape(-1).to(hidden.device)
            if id(module) not in self._checked:
                self._check(module, args, kwargs, output)
                self._checked.add(id(module))
            for expert, params in table.items():
                routed = (index == expert).any(-1) & real
                rows = routed if self.mode == "routed" else real
                x = hidden[rows]
                count = int(routed.sum())
                if "gate_up_proj" in params:
                    self.stats[params["gate_up_proj"]].update(x)
                    self.routed[params["gate_up_proj"]] += count
                if "down_proj" in params:
                    gate, up = nn.functional.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
                    self.stats[params["down_proj"]].update(module.act_fn(gate) * up)
                    self.routed[params["down_proj"]] += count

        return hook

    @staticmethod
    def _check(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden, index = _expert_inputs(module, args, kwargs)
        weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights")
        out = output[0] if isinstance(output, tuple) else output
        if weights is None or not torch.is_tensor(out):
            return
        flat = hidden.reshape(-1, hidden.shape[-1])
        want = torch.zeros_like(flat, dtype=torch.float32)
        for expert in range(module.gate_up_proj.shape[0]):
            token, slot = torch.where(index == expert)
            if token.numel():
                gate, up = nn.functional.linear(flat[token], module.gate_up_proj[expert]).chunk(2, dim=-1)
                y = nn.functional.linear(module.act_fn(gate) * up, module.down_proj[expert])
                want.index_add_(0, token, (y * weights[token, slot, None]).float())
        got = out.reshape(want.shape).float()
        tolerance = 1e-3 * max(1.0, float(want.abs().max()))
        if not float((got - want).abs().max()) <= tolerance:
            raise UnsupportedModelError(
                f"{type(module).__name__} holds fused expert weights (gate_up_proj {tuple(module.gate_up_proj.shape)},"
                f" down_proj {tuple(module.down_proj.shape)}) but does not compute act(gate) * up -> down per routed "
                "expert as the stock transformers layout does; hf_prune cannot prune its experts one by one. "
                "Exclude them (exclude_modules=['experts']) to prune the rest.")

    def __enter__(self) -> "ExpertStatsCollector":
        for owner, table in self.owners.values():
            self._handles.append(owner.register_forward_hook(self._hook(owner, table), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.token_mask = None
