"""``InputCompensatedModel``: a pruned model with a compensation pool on its input, trained like an adapter.

The wrapper keeps the pruned model's forward signature (``Trainer``, pipelines and ``generate`` keep working)
and injects the compensation through hooks:

- language models (``inject="inputs_embeds"``): a forward hook on ``get_input_embeddings()`` adds
  ``Δ(e)`` to the embedding ``e`` of every token; the query is ``e`` itself, so there is no extra pass, and
  ``merge_and_unload()`` folds the pool into the embedding table (zero overhead afterwards);
- vision towers (``inject="pixel_values"``): a forward pre-hook on the module that first reads
  ``pixel_values`` computes the query with a frozen module of the pruned model (by default the patch
  embedding, mean-pooled over patches) and adds ``Δ`` (reshaped to the image) to the pixels.

With a ``teacher`` (the dense model) attached, ``forward`` returns the training loss (KL to the teacher's
logits, MSE to its features and/or the task loss) whenever the wrapper is training or ``labels`` are given:
``Trainer`` callbacks cannot change the loss, so it lives here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import warnings
from collections import OrderedDict
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...artifacts.cards import CARD_NAME, card_data, hub_base_model, render_card
from ...artifacts.hub import load_files, push_pretrained
from ...artifacts.save import model_source
from ...atomic import atomic_file, atomic_output_dir
from ...config import PrunerConfig
from ...engine.report import model_totals
from ...errors import HFPruneError, did_you_mean
from ...models import get_family, is_causal_lm, pixel_input
from ...registry import card_template
from ...training.weight_masks import WeightMasks
from ...version import __version__
from .config import InputCompensationConfig
from .ops import (
    attention_entropy,
    compensation,
    conv2d_flops,
    default_temperature,
    fold_into_table,
    kd_kl_loss,
    masked_mse,
    pool_flops,
    pool_parameters,
)

CONFIG_FILE = "ic_config.json"
POOL_FILE = "ic_pool.safetensors"
METADATA_KEY = "ic_metadata"

KD_FIELDS = ("logits", "logits_per_image")
FEATURE_FIELDS = ("logits", "logits_per_image", "image_embeds", "pooler_output", "last_hidden_state")


class InputCompensator(nn.Module):
    """The pool: keys ``K`` [m, d_q] ~ N(0, 1) (seeded) and values ``V`` [m, d_x] = 0, float32."""
    def __init__(self, pool_size: int, query_dim: int, value_dim: int, temperature: float,
                 normalize_query: bool, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.keys = nn.Parameter(torch.randn(pool_size, query_dim, generator=generator))
        self.values = nn.Parameter(torch.zeros(pool_size, value_dim))
        self.temperature = float(temperature)
        self.normalize_query = bool(normalize_query)

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compensation(query, self.keys, self.values, self.temperature, self.normalize_query)

    def extra_repr(self) -> str:
        m, dq = self.keys.shape
        return f"pool_size={m}, query_dim={dq}, value_dim={self.values.shape[1]}, temperature={self.temperature:g}"


def _output_tensor(output: Any) -> torch.Tensor:
    """The tensor an encoder module produced (its pooled output when it returns a ModelOutput)."""
    if torch.is_tensor(output):
        return output
    for name in ("pooler_output", "image_embeds", "last_hidden_state"):
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if torch.is_tensor(value):
            return value
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise HFPruneError(f"the IC encoder returned {type(output).__name__}, from which no query tensor can be taken; "
                       "pick a module that returns a tensor (e.g. the patch embedding).")


def _pool_query(features: torch.Tensor, query_pool: str) -> torch.Tensor:
    """One query vector per image: mean over patches ([B, C, h, w] conv maps or [B, N, d] sequences)."""
    if features.dim() == 2:
        return features
    if query_pool != "mean":
        raise HFPruneError(f"the IC encoder gives {tuple(features.shape)} per batch, several vectors per image; use "
                           "query_pool='mean' (or 'auto') to pool them into one query per image.")
    if features.dim() == 4:  # a convolution's [B, C, h, w] feature map
        return features.mean(dim=(2, 3))
    return features.reshape(features.shape[0], -1, features.shape[-1]).mean(dim=1)


def _carries_pool_hooks(model: nn.Module) -> bool:
    """Whether a hook of an ``InputCompensatedModel`` is installed anywhere in ``model``."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            if any(isinstance(getattr(h, "__self__", None), InputCompensatedModel) for h in hooks.values()):
                return True
    return False


class InputCompensatedModel(nn.Module):
    """A pruned model plus a trainable input-compensation pool (see the module docstring).

    >>> ic = InputCompensatedModel(pruned, InputCompensationConfig(pool_size=64), teacher=dense)
    >>> Trainer(model=ic, args=args, train_dataset=ds, callbacks=[InputCompensationCallback()]).train()
    >>> ic.save_pretrained("ic/")            # ic_config.json + ic_pool.safetensors, the base saved separately
    >>> plain = ic.merge_and_unload()        # LMs: the pool folded into the embedding table

    ``state_dict()`` holds only what training changes (the pool, plus the retained weights with
    ``train_base="retained"``), so ``Trainer`` checkpoints stay small and resume correctly; the frozen base
    is saved with its own ``save_pretrained``. Attribute lookups that the wrapper does not define fall
    through to the base model (``config``, ``generate``, ``device``, ...).
    """

    accepts_loss_kwargs = False  # the loss is computed here; Trainer scales it for gradient accumulation

    def __init__(self, model: nn.Module, config: InputCompensationConfig, teacher: nn.Module | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"InputCompensatedModel needs the pruned transformers model, got {type(model).__name__}.")
        if isinstance(model, InputCompensatedModel):
            raise TypeError("the model already carries an input-compensation pool; unload() it first.")
        if not isinstance(config, InputCompensationConfig):
            raise TypeError(f"InputCompensatedModel needs an InputCompensationConfig, got {type(config).__name__}.")
        if teacher is model:
            raise ValueError("teacher is the pruned model itself; pass the dense model it was pruned from "
                             "(e.g. a copy.deepcopy taken before pruning).")
        resolved, plan = self._plan(model, config)
        if _carries_pool_hooks(model):
            raise HFPruneError("this model already has an input-compensation pool's hooks (it is wrapped by an "
                               "InputCompensatedModel, or is a copy.deepcopy of a wrapped model); wrap the model "
                               "itself once, or take copies before wrapping, or call ic.unload() first.")
        self.base_model = model
        self.ic_config = resolved
        self._plan_info = plan
        device = next(model.parameters()).device
        self.pool = InputCompensator(resolved.pool_size, plan["query_dim"], plan["value_dim"], resolved.temperature,
                                     resolved.normalize_query, resolved.init_seed).to(device)
        self.weight_masks: WeightMasks | None = None
        if resolved.train_base == "retained":
            self.weight_masks = WeightMasks.from_model(model)
            if not self.weight_masks.masks:
                raise ValueError("train_base='retained' found no pruned Linear weight (none holds zeros) inside the "
                                 "transformer blocks; prune the model first, or use train_base=False.")
        object.__setattr__(self, "_teacher", None)
        if teacher is not None:
            self.attach_teacher(teacher)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.freeze_base_()
        self._stats: dict[str, torch.Tensor] = {}
        self._context: dict[str, Any] = {}
        self._suspended = False
        self._detached = False
        self._callback_attached = False
        self._warned_no_callback = False
        self.kept: dict | None = None  # keep_best: the step whose pool InputCompensationCallback restored
        self._hooks = self._install_hooks()
        self.train(model.training)  # the wrapper starts in the base model's mode
        # Trainer and pipelines read the forward signature (dataset columns to keep): expose the base's.
        forward = functools.partial(type(self).forward, self)
        forward.__signature__ = inspect.signature(model.forward)
        object.__setattr__(self, "forward", forward)

    # ------------------------------------------------------------------------------------------ planning
    @staticmethod
    def _plan(model: nn.Module, config: InputCompensationConfig) -> tuple[InputCompensationConfig, dict]:
        """Resolve ``auto`` fields against the model and work out the query/value dimensions; raise on any
        combination that cannot work, before the model is touched."""
        inject = config.inject
        pixels = None
        if inject in ("auto", "pixel_values"):
            try:
                pixels = pixel_input(model)
            except HFPruneError:
                if inject == "pixel_values":
                    raise HFPruneError(f"inject='pixel_values' needs a vision tower reading pixel_values (ViT, CLIP); "
                                       f"{type(model).__name__} has none. Use inject='inputs_embeds'.") from None
            inject = "pixel_values" if pixels is not None else "inputs_embeds"
        names = dict(model.named_modules())
        encoder = config.encoder
        plan: dict[str, Any] = {"inject": inject}
        if inject == "inputs_embeds":
            embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if not isinstance(embedding, nn.Embedding):
                raise HFPruneError(f"inject='inputs_embeds' needs a model whose get_input_embeddings() is an "
                                   f"nn.Embedding; {type(model).__name__} has none.")
            embed_name = next(n for n, m in names.items() if m is embedding)
            if encoder not in ("embedding", "identity") and names.get(encoder) is not embedding:
                if encoder not in names:
                    raise HFPruneError(f"InputCompensationConfig.encoder={encoder!r} is not a module of "
                                       f"{type(model).__name__}.{did_you_mean(encoder, list(names))}")
                raise HFPruneError(f"for inject='inputs_embeds' the query is the token's input embedding: use "
                                   f"encoder='embedding' (= {embed_name!r}); {encoder!r} is another module.")
            query_pool = "none" if config.query_pool == "auto" else config.query_pool
            if query_pool == "mean" and is_causal_lm(model):
                raise HFPruneError("query_pool='mean' pools the whole sequence into the query, which lets every token "
                                   "see future tokens and breaks generation with a KV cache; decoder LMs need "
                                   "query_pool='none' (per-token queries, foldable into the embedding table).")
            dim = embedding.embedding_dim
            plan.update(encoder_module=embed_name, inject_module=embed_name, query_dim=dim, value_dim=dim,
                        queries_per="token" if query_pool == "none" else "sequence")
        else:
            channels, height, width = pixels.shape
            if encoder == "embedding":
                encoder_module = pixels.embedding
            elif encoder == "identity":
                encoder_module = None
            elif encoder in names:
                encoder_module = encoder
            else:
                raise HFPruneError(f"InputCompensationConfig.encoder={encoder!r} is not a module of "
                                   f"{type(model).__name__}.{did_you_mean(encoder, list(names))}")
            with torch.no_grad():
                probe = torch.zeros(1, channels, height, width, device=next(model.parameters()).device,
                                    dtype=next(model.parameters()).dtype)
                features = probe.flatten(1) if encoder_module is None else _output_tensor(names[encoder_module](probe))
            query_pool = config.query_pool
            if query_pool == "auto":
                query_pool = "none" if features.dim() == 2 else "mean"
            query_dim = _pool_query(features, query_pool).shape[-1]  # raises when per-patch features are not pooled
            plan.update(encoder_module=encoder_module, inject_module=pixels.consumer, query_dim=query_dim,
                        value_dim=channels * height * width, pixel_shape=[channels, height, width],
                        queries_per="image")
        temperature = config.temperature or default_temperature(plan["query_dim"])
        resolved = dataclasses.replace(config, inject=inject, query_pool=query_pool, temperature=temperature)
        return resolved, plan

    # ------------------------------------------------------------------------------------------ hooks
    def _install_hooks(self) -> list:
        model = self.base_model
        hooks = []
        if self.ic_config.inject == "inputs_embeds":
            hooks.append(model.get_input_embeddings().register_forward_hook(self._embedding_hook))
            if self.ic_config.query_pool == "mean":  # the padding mask of the call, for a masked mean
                hooks.append(model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
                hooks.append(model.register_forward_hook(self._clear_context))
        else:
            consumer = model.get_submodule(self._plan_info["inject_module"])
            hooks.append(consumer.register_forward_pre_hook(self._pixel_hook, with_kwargs=True))
        return hooks

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        self._context["attention_mask"] = bound.get("attention_mask")

    def _clear_context(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._context.clear()

    def _embedding_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._suspended:
            return None
        query = output
        if self.ic_config.query_pool == "mean":
            mask = self._context.get("attention_mask")
            if mask is None or tuple(mask.shape) != tuple(output.shape[:2]):
                query = output.to(torch.float32).mean(dim=1)
            else:
                weights = mask.to(torch.float32).unsqueeze(-1)
                query = (output.to(torch.float32) * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        delta, attn = self.pool(query)
        if delta.dim() < output.dim():
            delta = delta.unsqueeze(1).expand_as(output)
        self._record(output, delta, attn)
        return output + delta.to(output.dtype)

    def _pixel_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._suspended:
            return None
        if "pixel_values" in kwargs:
            pixels = kwargs["pixel_values"]
        elif args:
            pixels = args[0]
        else:
            return None
        if pixels is None:
            return None
        expected = tuple(self._plan_info["pixel_shape"])
        if tuple(pixels.shape[1:]) != expected:
            raise HFPruneError(f"the compensation pool was built for pixel_values of shape {expected} per image, got "
                               f"{tuple(pixels.shape[1:])}; resize the images as the model's processor does.")
        self._suspended = True  # the query pass below may run this very module again
        try:
            with torch.no_grad():
                encoder = self._plan_info["encoder_module"]
                if encoder is None:
                    features = pixels.flatten(1)
                else:
                    enc = self.base_model.get_submodule(encoder)
                    weight = next(enc.parameters(), None)
                    source = pixels.to(weight.dtype) if weight is not None else pixels
                    features = _output_tensor(enc(source))
                query = _pool_query(features, self.ic_config.query_pool)
        finally:
            self._suspended = False
        delta, attn = self.pool(query)
        self._record(pixels, delta, attn)
        new = pixels + delta.view(pixels.shape).to(pixels.dtype)
        if "pixel_values" in kwargs:
            return args, {**kwargs, "pixel_values": new}
        return (new, *args[1:]), kwargs

    def _record(self, inputs: torch.Tensor, delta: torch.Tensor, attn: torch.Tensor) -> None:
        if not self.training:
            return
        with torch.no_grad():
            values = {"delta_sq": delta.detach().pow(2).sum(), "input_sq": inputs.detach().to(torch.float32).pow(2).sum(),
                      "entropy": attention_entropy(attn.detach()).sum(), "queries": torch.tensor(
                          float(attn.numel() // attn.shape[-1]), device=attn.device)}
            for key, value in values.items():
                self._stats[key] = self._stats[key] + value if key in self._stats else value

    def pop_statistics(self) -> dict[str, float]:
        """Pool statistics since the last call (training forwards only), and reset them:
        ``ic_delta_ratio`` = ‖Δx‖/‖x‖ over all inputs seen; ``ic_attention_entropy`` = mean entropy (nats) of the
        pool attention (``ic_attention_entropy_max`` = log m is uniform; near 0 means collapse onto one entry)."""
        stats, self._stats = self._stats, {}
        if not stats:
            return {}
        ratio = (stats["delta_sq"] / stats["input_sq"].clamp_min(1e-30)).sqrt()
        return {"ic_delta_ratio": float(ratio), "ic_attention_entropy": float(stats["entropy"] / stats["queries"]),
                "ic_attention_entropy_max": float(torch.log(torch.tensor(float(self.ic_config.pool_size))))}

    # ------------------------------------------------------------------------------------------ teacher
    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    def attach_teacher(self, teacher: nn.Module | None) -> None:
        """Attach (or with ``None`` detach) the dense teacher: frozen, always in eval mode, moved with the wrapper."""
        if teacher is not None:
            if not isinstance(teacher, nn.Module):
                raise TypeError(f"teacher must be the dense model (torch.nn.Module), got {type(teacher).__name__}.")
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)

    def check_ready_to_train(self) -> None:
        """Raise if training cannot compute its loss (a teacher-based loss without a teacher)."""
        if self._detached:
            raise HFPruneError("this InputCompensatedModel was unloaded/merged; use the model it returned.")
        if self.ic_config.needs_teacher and self._teacher is None:
            raise HFPruneError(f"InputCompensationConfig.loss={self.ic_config.loss!r} compares with the dense model: "
                               "pass teacher=dense_model (or call attach_teacher(dense_model)), or use loss='task' to "
                               "train on labels only.")

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> "InputCompensatedModel":
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()
        return self

    # ------------------------------------------------------------------------------------------ parameters
    def freeze_base_(self) -> None:
        """Only the pool trains; with ``train_base="retained"`` the pruned Linear weights train too (their pruned
        positions are kept at zero by ``InputCompensationCallback``)."""
        trainable = set(self.weight_masks.masks) if self.weight_masks is not None else set()
        for name, p in self.base_model.named_parameters():
            p.requires_grad_(name in trainable)
        for p in self.pool.parameters():
            p.requires_grad_(True)

    def _trainable_named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        out = [("pool.keys", self.pool.keys), ("pool.values", self.pool.values)]
        if self.weight_masks is not None:
            out += [(f"base_model.{name}", self.base_model.get_parameter(name)) for name in self.weight_masks.masks]
        return out

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """What training changes: the pool, plus the retained Linear weights with ``train_base="retained"``."""
        if args:
            raise TypeError("InputCompensatedModel.state_dict takes keyword arguments only.")
        out = OrderedDict() if destination is None else destination
        for name, tensor in self._trainable_named_tensors():
            out[prefix + name] = tensor if keep_vars else tensor.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        from torch.nn.modules.module import _IncompatibleKeys

        own = dict(self._trainable_named_tensors())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(f"InputCompensatedModel.load_state_dict: missing keys {missing}, unexpected keys "
                               f"{unexpected}.")
        with torch.no_grad():
            for name, tensor in own.items():
                if name in state_dict:
                    value = state_dict[name]
                    if tuple(value.shape) != tuple(tensor.shape):
                        raise RuntimeError(f"{name}: checkpoint shape {tuple(value.shape)} != {tuple(tensor.shape)}.")
                    tensor.copy_(value.to(tensor.dtype))
        return _IncompatibleKeys(missing, unexpected)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "pool", "_teacher") or name.startswith("__"):
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        """The base model's forward with compensated inputs; with a teacher, the IC training loss as ``loss``
        (computed when training or when ``labels`` are given; plain inference never runs the teacher)."""
        if self._detached:
            raise HFPruneError("this InputCompensatedModel was unloaded/merged; use the model it returned.")
        terms = self.ic_config.loss_terms
        if (self.training and self.weight_masks is not None and not self._callback_attached
                and not self._warned_no_callback and torch.is_grad_enabled()):
            self._warned_no_callback = True
            warnings.warn("train_base='retained' trains the pruned weights: train through Trainer with "
                          "InputCompensationCallback (or call weight_masks.mask_grads_/clean_optimizer_/apply_ around "
                          "each optimizer step), otherwise the pruned weights do not stay zero.", stacklevel=2)
        if labels is not None:
            kwargs["labels"] = labels
        if self.training and torch.is_grad_enabled():
            self.check_ready_to_train()
        outputs = self.base_model(*args, **kwargs)
        if not (self.training or labels is not None):
            return outputs
        if self.ic_config.needs_teacher and self._teacher is None:
            return outputs  # evaluation with labels but no teacher: the model's own outputs and loss
        if not isinstance(outputs, dict):
            raise HFPruneError("the IC loss needs dict outputs; do not pass return_dict=False while training.")
        teacher_outputs = None
        if self.ic_config.needs_teacher:
            teacher_kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
            with torch.no_grad():
                teacher_outputs = self._teacher(*args, **teacher_kwargs)
        loss = None
        for name, weight in terms.items():
            term = self._loss_term(name, outputs, teacher_outputs, kwargs)
            loss = weight * term if loss is None else loss + weight * term
        fields = {k: v for k, v in outputs.items() if k != "loss"}
        return type(outputs)(loss=loss, **fields)

    def _loss_term(self, name: str, outputs: Any, teacher_outputs: Any, kwargs: dict) -> torch.Tensor:
        if name == "task":
            loss = outputs.get("loss")
            if loss is None:
                raise HFPruneError("loss='task' needs the model's own loss: put 'labels' (or what the model needs, "
                                   "e.g. return_loss=True for CLIP) in the batch.")
            return loss
        if name == "kd_kl":
            field = next((f for f in KD_FIELDS if outputs.get(f) is not None), None)
            if field is None:
                raise HFPruneError(f"loss='kd_kl' needs logits; {type(outputs).__name__} has none of {KD_FIELDS}. Use "
                                   "loss='mse' with feature=... instead.")
            student, teacher = outputs[field], teacher_outputs[field]
            return kd_kl_loss(student, teacher, self.ic_config.kd_temperature, self._position_mask(student, kwargs))
        fields = (self.ic_config.feature,) if self.ic_config.feature else FEATURE_FIELDS
        field = next((f for f in fields if outputs.get(f) is not None), None)
        if field is None or teacher_outputs.get(field) is None:
            raise HFPruneError(f"loss='mse' compares an output field, but {type(outputs).__name__} has none of "
                               f"{fields} (set InputCompensationConfig.feature to one it returns).")
        student, teacher = outputs[field], teacher_outputs[field]
        return masked_mse(student, teacher, self._position_mask(student, kwargs))

    @staticmethod
    def _position_mask(tensor: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        mask = kwargs.get("attention_mask")
        if mask is not None and tensor.dim() == 3 and tuple(mask.shape) == tuple(tensor.shape[:2]):
            return mask.bool()
        return None

    # ------------------------------------------------------------------------------------------ fold / unload
    def foldable(self) -> tuple[bool, str]:
        """Whether ``merge_and_unload`` can fold the pool into the embedding table, and why not."""
        cfg = self.ic_config
        if cfg.inject != "inputs_embeds":
            return False, ("the compensation is added to pixel_values and depends on the whole image, so no weight of "
                           "the model can absorb it; keep the pool attached (its overhead is in report()).")
        if cfg.query_pool != "none":
            return False, ("query_pool='mean' makes the compensation depend on the whole sequence, not on the token "
                           "id alone, so it cannot be folded into the embedding table.")
        return True, ""

    def _detach(self) -> nn.Module:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))
        self._detached = True
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove the hooks and return the base model unchanged (without the compensation)."""
        return self._detach()

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold the pool into the input embedding table (untying tied input/output embeddings first, so the
        output head keeps the original table) and return the plain transformers model. Its outputs equal the
        wrapped model's; the pool's parameter and FLOP overhead becomes zero."""
        ok, why = self.foldable()
        if not ok:
            raise HFPruneError(f"merge_and_unload() is not possible here: {why}")
        model = self.base_model
        embedding = model.get_input_embeddings()
        scale = self._embedding_scale(embedding)  # checked before anything changes
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None and getattr(output, "weight", None) is not None and \
                output.weight.data_ptr() == embedding.weight.data_ptr():
            output.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=output.weight.requires_grad)
            for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
                if getattr(cfg, "tie_word_embeddings", False):
                    cfg.tie_word_embeddings = False
            if hasattr(model, "get_expanded_tied_weights_keys"):
                model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
        folded = fold_into_table(embedding.weight.detach(), self.pool.keys, self.pool.values, self.pool.temperature,
                                 self.pool.normalize_query, scale=scale)
        embedding.weight.copy_(folded)
        return self._detach()

    @torch.no_grad()
    def _embedding_scale(self, embedding: nn.Module) -> float:
        """The factor ``s`` of an embedding module whose output is ``s * weight[ids]`` (1 for ``nn.Embedding``;
        Gemma's scaled embeddings multiply by ``sqrt(hidden)``), measured on a few rows with the hook suspended;
        an embedding whose output is not a scalar multiple of its rows cannot take the fold."""
        weight = embedding.weight.detach()
        ids = torch.arange(min(weight.shape[0], 64), device=weight.device)
        suspended, self._suspended = self._suspended, True
        try:
            out = embedding(ids).detach()
        finally:
            self._suspended = suspended
        rows = weight[ids]
        w32, o32 = rows.to(torch.float32), out.to(torch.float32)
        denominator = float(w32.pow(2).sum())
        scale = float((w32 * o32).sum()) / denominator if denominator > 0 else 1.0
        if out.shape != rows.shape or not torch.allclose(o32, w32 * scale, rtol=1e-3, atol=1e-6):
            raise HFPruneError(f"merge_and_unload() is not possible here: {type(embedding).__name__} does not return "
                               "a constant multiple of its embedding rows, so no change of its table reproduces the "
                               "compensation; keep the pool attached (InputCompensatedModel) instead.")
        if abs(scale - 1.0) < 1e-6:
            return 1.0
        return scale

    # ------------------------------------------------------------------------------------------ report
    def report(self) -> dict:
        """IC's parameters and FLOPs, and the base model's sparsity with them included.

        ``effective_sparsity`` = zeros of the base / (base parameters + pool parameters); the same over the
        pruned Linear weights alone. ``after_merge`` gives the overhead once ``merge_and_unload()`` folded the
        pool into the embedding table (zero for language models with per-token queries)."""
        plan, cfg = self._plan_info, self.ic_config
        m, dq, dx = cfg.pool_size, plan["query_dim"], plan["value_dim"]
        params = pool_parameters(m, dq, dx)
        per_query = pool_flops(m, dq, dx, cfg.normalize_query)
        encoder_flops = 0
        if plan["inject"] == "pixel_values" and plan["encoder_module"] is not None:
            enc = self.base_model.get_submodule(plan["encoder_module"])
            if isinstance(enc, nn.Conv2d):
                encoder_flops = conv2d_flops(enc, *plan["pixel_shape"][1:])
            else:
                encoder_flops = None  # a whole module: as costly as that part of the model's own forward
        totals = model_totals(self.base_model)
        masks = self.weight_masks
        if masks is None and self._has_blocks():
            masks = WeightMasks.from_model(self.base_model)
        linear = None
        if masks is not None and masks.masks:
            numel = sum(mk.numel() for mk in masks.masks.values())
            zeros = sum(int((self.base_model.get_parameter(n) == 0).sum()) for n in masks.masks)
            linear = {"parameters": numel, "zeros": zeros, "sparsity": zeros / numel,
                      "sparsity_with_ic": zeros / (numel + params)}
        foldable, why = self.foldable()
        return {
            "method": cfg.method,
            "config": cfg.to_dict(),
            "pool": {"size": m, "query_dim": dq, "value_dim": dx, "parameters": params,
                     "queries_per": plan["queries_per"], "encoder_module": plan["encoder_module"],
                     "inject_module": plan["inject_module"]},
            "flops": {"per_query": per_query, "encoder_per_input": encoder_flops,
                      "note": f"one query per {plan['queries_per']}; the LM query is the embedding lookup itself "
                              "(no extra pass)" if plan["inject"] == "inputs_embeds" else
                              f"one query per {plan['queries_per']}, plus a second pass of the encoder module"},
            "base": totals,
            "pruned_linear": linear,
            "effective_sparsity": totals["zeros"] / (totals["parameters"] + params),
            "kept": self.kept,
            "after_merge": ({"parameters": 0, "flops_per_query": 0, "effective_sparsity": totals["sparsity"],
                             "note": "merge_and_unload() folds the pool into the embedding table: zero parameter "
                                     "and zero FLOP overhead; the model is a plain transformers model."}
                            if foldable else {"foldable": False, "note": why}),
        }

    def _has_blocks(self) -> bool:

        try:
            get_family(self.base_model).stages(self.base_model)
            return True
        except HFPruneError:
            return False

    # ------------------------------------------------------------------------------------------ save / load
    def _metadata(self) -> dict:
        base = self.base_model
        name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        meta = {"hf_prune_version": __version__, "base_model_class": type(base).__name__,
                "base_model_name_or_path": name,
                **{k: self._plan_info[k] for k in ("query_dim", "value_dim", "encoder_module", "inject_module")},
                "pixel_shape": self._plan_info.get("pixel_shape"),
                "base_weights_trained": self.ic_config.train_base == "retained"}
        pruning = os.path.join(name, "pruning_config.json") if isinstance(name, str) else None
        if pruning and os.path.isfile(pruning):
            with open(pruning, encoding="utf-8") as fh:
                record = json.load(fh)
            meta["base_pruning"] = {k: record.get(k) for k in ("method", "sparsity", "pattern")}
        return meta

    def write_files(self, folder: str | os.PathLike) -> None:
        """Write ``ic_config.json`` and ``ic_pool.safetensors`` into the existing ``folder``, leaving its other files
        alone: for a folder the pool shares, a ``Trainer`` checkpoint (``InputCompensationCallback.on_save``). Both
        files are staged before either is renamed (the pool first, the config last), so a failure leaves no
        half-written file. A folder of the pool's own is written by ``save_pretrained``."""
        payload = {**self.ic_config.to_dict(), METADATA_KEY: self._metadata()}
        tensors = {"keys": self.pool.keys.detach().to("cpu", torch.float32).contiguous(),
                   "values": self.pool.values.detach().to("cpu", torch.float32).contiguous()}
        with atomic_file(os.path.join(folder, CONFIG_FILE)) as tmp_cfg, \
                atomic_file(os.path.join(folder, POOL_FILE)) as tmp_pool:
            save_file(tensors, tmp_pool, metadata={"format": "pt", "hf_prune": __version__})
            with open(tmp_cfg, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=2, sort_keys=True, default=str)
                fh.write("\n")

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Write ``ic_config.json`` and ``ic_pool.safetensors`` into ``save_directory``: the pool's own folder,
        next to the pruned base, which is saved separately with its ``save_pretrained`` (with
        ``train_base="retained"`` save the base too, its kept weights changed). Returns the folder.

        The folder is written like every hf_prune output (``hf_prune.atomic.atomic_output_dir``): it appears
        complete or not at all; a folder holding a previous hf_prune output (a pool saved before) is replaced only
        with ``overwrite=True``; any other non-empty folder, and the base model's own folder, are refused before
        anything is written. (Earlier versions renamed the two files into any folder and left its other files
        there; a pool saved into the pruned base's folder now needs a folder of its own. Writing into a folder
        the pool shares, as the Trainer callback does with checkpoints, is ``write_files``.)"""
        with atomic_output_dir(save_directory, overwrite=overwrite, sources=(model_source(self.base_model),)) as tmp:
            self.write_files(tmp)
        return os.path.abspath(os.fspath(save_directory))

    @classmethod
    def from_pretrained(cls, model: nn.Module, pretrained_path: str | os.PathLike, *, teacher: nn.Module | None = None,
                        revision: str | None = None, token: str | bool | None = None,
                        subfolder: str | None = None) -> "InputCompensatedModel":
        """Re-attach a saved pool (a folder or a Hub repo holding ``ic_config.json`` + ``ic_pool.safetensors``)
        to ``model``, the pruned base it was trained on."""
        path = os.fspath(pretrained_path)
        files = load_files(path, [CONFIG_FILE, POOL_FILE], what="the input compensation pool",
                           writer="InputCompensatedModel.save_pretrained", subfolder=subfolder, revision=revision,
                           token=token)
        with open(files[CONFIG_FILE], encoding="utf-8") as fh:
            payload = json.load(fh)
        meta = payload.pop(METADATA_KEY, {}) or {}
        config = PrunerConfig.from_dict(payload)
        if not isinstance(config, InputCompensationConfig):
            raise HFPruneError(f"{files[CONFIG_FILE]} holds a {type(config).__name__}, not an input compensation pool.")
        tensors = load_file(files[POOL_FILE])
        ic = cls(model, config, teacher=teacher)
        expected = {"keys": tuple(ic.pool.keys.shape), "values": tuple(ic.pool.values.shape)}
        for key, shape in expected.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else None
                raise HFPruneError(f"{files[POOL_FILE]}: {key} has shape {got} but this model needs {shape}; the pool "
                                   f"was trained for {meta.get('base_model_class')} "
                                   f"({meta.get('base_model_name_or_path')}), not this base model.")
        trained_on = meta.get("base_model_class")
        if trained_on and trained_on != type(model).__name__:
            warnings.warn(f"the pool in {path!r} was trained on a {trained_on}, this base is a "
                          f"{type(model).__name__}; its outputs will not be what training produced.", stacklevel=2)
        with torch.no_grad():
            ic.pool.keys.copy_(tensors["keys"])
            ic.pool.values.copy_(tensors["values"])
        return ic

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                    commit_description: str | None = None) -> Any:
        """Upload ``ic_config.json``, ``ic_pool.safetensors`` and the pool's card (``README.md``, from
        ``model_cards/input_compensation.md.j2``) in one commit, through the same path as every hf_prune artifact
        (the repo is created first; no network or a refused token raises ``hf_prune.errors.HubError``).
        Returns ``huggingface_hub.CommitInfo``."""
        def save(folder: str) -> None:
            self.save_pretrained(folder)
            self.model_card(repo_id=repo_id).save(os.path.join(folder, CARD_NAME))

        return push_pretrained(save, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
                               commit_message=commit_message or "Upload input compensation pool with hf_prune",
                               commit_description=commit_description)

    def model_card(self, *, repo_id: str | None = None):
        """The ``huggingface_hub.ModelCard`` of this pool."""
        rep = self.report()
        meta = self._metadata()
        base = hub_base_model(meta.get("base_model_name_or_path"))
        label = meta.get("base_model_name_or_path") or meta["base_model_class"]
        title = f"Input compensation pool for {base.split('/')[-1] if base else meta['base_model_class']}"
        foldable, _ = self.foldable()
        return render_card(
            card_data(base, title, ["input-compensation"]), card_template(self.ic_config.method), title=title,
            version=__version__, base_model=base, base_label=label, base_pruning=meta.get("base_pruning"),
            base_trained=meta["base_weights_trained"],
            encoder_module=meta["encoder_module"] or self.ic_config.encoder, inject=self.ic_config.inject,
            load_path=repo_id or "path/to/this/folder", foldable=foldable, pool=rep["pool"],
            flops_per_query=rep["flops"]["per_query"], effective_sparsity=rep["effective_sparsity"],
            base_sparsity=rep["base"]["sparsity"], after_merge=rep["after_merge"]["note"],
            config_json=json.dumps(self.ic_config.to_dict(), indent=2, sort_keys=True))
