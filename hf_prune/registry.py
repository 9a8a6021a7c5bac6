"""The method registry: one ``MethodSpec`` per pruning method, with the capabilities the rest of the code asks for.

A leaf module (it imports nothing of hf_prune): the pruner, the CLI, the planner, checkpoints and cards ask a
method's spec what it can do instead of testing its name. ``import hf_prune`` registers the built-in methods
(``hf_prune.methods``); a method defined elsewhere registers itself with ``register_method``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

DEFAULT_CARD = "pruned_model.md.j2"


@dataclass(frozen=True)
class MethodCost:
    """What the planner needs to estimate a run (``hf-prune plan``).

    ``statistics``: what the engine accumulates per targeted Linear (``"sq_norm"``, ``"gram"``); ``solve``:
    ``(in_features, out_features) -> (bytes, flops)`` of the per-Linear solve (None: no solve);
    ``extra_stage``: a callable that plans a stage run before the layer-wise walk (an allocator's scoring), called
    as ``extra_stage(model, stages, planned, width, batch_size, seq_len)`` and returning a ``StagePlan``.
    """

    statistics: frozenset = frozenset()
    solve: Callable[[int, int], tuple[int, float]] | None = None
    extra_stage: Callable[..., Any] | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, config class, run function and capabilities.

    - ``run(pruner, config, *, device, progress[, checkpoint]) -> PruningResult``; None for a method that is
      trained rather than run by ``Pruner.prune`` (``kind="trained"``, see ``how_to_run``).
    - ``display_name``: how cards and tables name it (``"SparseGPT"``).
    - ``kind``: ``"one-shot"`` (``Pruner.prune`` runs it) or ``"trained"`` (a Trainer drives it).
    - ``resumable``: ``run`` accepts a ``checkpoint`` and resumes bit-identically.
    - ``offload``: works on accelerate CPU/disk-offloaded models.
    - ``layerwise``: prunes each Linear from its own statistics, so it can take an allocation's ``module_sparsity``
      (an allocator's stage 2).
    - ``needs_data(config) -> bool``: whether a run with this config reads calibration data.
    - ``cost(config) -> MethodCost``: the planner's estimate inputs; None: the planner treats it as data-free.
    - ``card_template``: the template in ``model_cards/`` for the pruned model's card.
    - ``how_to_run``: for a trained method, what ``Pruner.prune`` tells the user to do instead.
    - ``default``: the method used where none is named (``hf-prune plan``, an allocator's stage 2); one method.
    - ``serves(model, config) -> str | None``: None when the method can prune ``model`` (with ``config``; None: its
      default config), else the reason it cannot. ``Pruner.prune`` refuses with that reason before anything
      changes, and the README's table of families x methods (``hf_prune.support``) is made from it. None: the
      method serves every model whose blocks are found.
    """

    name: str
    config_class: type
    run: Callable[..., Any] | None
    display_name: str = ""
    kind: str = "one-shot"
    resumable: bool = False
    offload: bool = False
    layerwise: bool = False
    needs_data: Callable[[Any], bool] = field(default=lambda config: True)
    cost: Callable[[Any], MethodCost] | None = None
    card_template: str = DEFAULT_CARD
    how_to_run: str = ""
    default: bool = False
    serves: Callable[[Any, Any], str | None] | None = None

    @property
    def summary(self) -> str:
        """The first line of the config class's docstring."""
        return (self.config_class.__doc__ or "").strip().splitlines()[0] if self.config_class.__doc__ else ""


_METHODS: dict[str, MethodSpec] = {}
KINDS = ("one-shot", "trained")


def register_method(config_class: type, run: Callable[..., Any] | None, **capabilities: Any) -> MethodSpec:
    """Register a pruning method: its config class (whose ``method`` names it), its run function and its
    capabilities (the fields of ``MethodSpec``). Returns the spec."""
    name = getattr(config_class, "method", "")
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"{config_class.__name__}.method must be a non-empty lowercase name, got {name!r}.")
    if name in _METHODS and _METHODS[name].config_class is not config_class:
        raise ValueError(f"a pruning method named {name!r} is already registered "
                         f"({_METHODS[name].config_class.__name__}).")
    kind = capabilities.get("kind", "one-shot")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a method kind; choose one of {', '.join(map(repr, KINDS))}.")
    if run is None and kind != "trained":
        raise ValueError(f"{name}: a one-shot method needs a run function.")
    unknown = sorted(set(capabilities) - {f for f in MethodSpec.__dataclass_fields__} - {"name", "config_class"})
    if unknown:
        raise TypeError(f"register_method got unknown capabilities {unknown}; see hf_prune.registry.MethodSpec.")
    capabilities.setdefault("display_name", name)
    spec = MethodSpec(name=name, config_class=config_class, run=run, **capabilities)
    _METHODS[name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method (for tests that register one of their own)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_specs() -> list[MethodSpec]:
    """Every registered method's spec, in registration order."""
    return list(_METHODS.values())


def default_method() -> str:
    """The name of the method registered as the default (see ``MethodSpec.default``)."""
    for spec in _METHODS.values():
        if spec.default:
            return spec.name
    raise ValueError("no pruning method is registered as the default; import hf_prune to register the built-ins.")


def card_template(method: str | None) -> str:
    """The card template of a method's pruned models (the default one for a method that is not registered)."""
    spec = _METHODS.get(method) if method else None
    return spec.card_template if spec is not None else DEFAULT_CARD


def display_name(method: str | None) -> str | None:
    """A method's display name, or the name itself for a method that is not registered (an old report)."""
    spec = _METHODS.get(method) if method else None
    return spec.display_name if spec is not None else method
