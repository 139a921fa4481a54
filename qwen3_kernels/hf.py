"""The kernels inside transformers' Qwen3: one call for Trainer, TRL and PEFT users.

``apply_kernels()`` patches transformers' Qwen3 classes so that models built afterwards run
``qwen3_kernels.ops``; ``apply_kernels(model)`` patches one model (a ``Qwen3ForCausalLM`` or
``Qwen3Model``, bare or inside a PEFT wrapper) completely, ``q_norm``/``k_norm`` included. Either way
parameters, their names and the state dict stay as they are: only ``forward`` methods change.

- RMSNorm -> ``ops.rms_norm``; the MLP -> ``ops.swiglu`` between its own ``gate_proj``/``up_proj``/
  ``down_proj`` (LoRA layers on them still run); QK-norm + RoPE -> ``ops.qk_norm_rope`` (one launch
  for q and k) inside a Qwen3Attention.forward that otherwise does what transformers' does.
- Attention through transformers' ``AttentionInterface`` as ``"qwen3_kernels"`` (so
  ``attn_implementation="qwen3_kernels"`` works without the rest): causal prefill, decoding from
  transformers' caches, and padding-free packed batches (``cu_seq_lens_q``/``max_length_q`` as
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` passes them, or sequence starts read
  from ``position_ids``) on ``ops.attention``. Padded batches, dropout and sliding windows go to
  transformers' SDPA path with the same mask (exact), the reason logged once.
- The causal-LM loss: in training, with labels, ``ops.linear_cross_entropy`` from the hidden states
  (the (tokens x vocab) logits are never built; ``logits`` is None, as Liger-Kernel does), with
  transformers' shift, ``ignore_index``, ``shift_labels``, ``num_items_in_batch`` (Trainer's gradient
  accumulation) and ``logits_to_keep``. In eval mode, or with ``skip_logits=False``, logits as before.

- Qwen3-MoE (``Qwen3MoeForCausalLM``, 30B-A3B and 235B-A22B) gets all of the above and its MoE
  block: the router's softmax + top-k -> ``ops.moe_route`` and the experts -> ``ops.moe_experts``,
  registered with transformers' ``ExpertsInterface`` as ``"qwen3_kernels"`` (the experts' own
  parameters, so their state dict and PEFT's view of them stay transformers'); the fused loss adds
  transformers' own load-balancing loss (``router_aux_loss_coef * aux_loss``) where router logits
  are requested, as transformers does.

Anything outside that (another architecture, a transformers older than 5) is an error that says so.
Where a module's inputs do not fit a kernel (a PEFT-wrapped norm or LM head), that module runs
transformers' own code: slower, never different. Under autocast on an fp32 model, half activations
meet fp32 norm weights and cos/sin: the kernels take them (fp32 math), and outputs keep the dtypes
transformers' modules give (an RMSNorm promotes to its weight's dtype).
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import weakref

import torch
import torch.nn.functional as F

from . import ops
from .model import IGNORE_INDEX

ATTENTION = "qwen3_kernels"  # the name registered with transformers' AttentionInterface
_SUPPORTED = "transformers 5.x (tested with 5.17 and 5.24)"

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning("qwen3_kernels: %s", message)


@functools.cache
def _qwen3():
    """transformers' Qwen3 modelling module, after checking this transformers is one we support;
    transformers' own forwards are taken here, before anything is patched."""
    try:
        import transformers
        from transformers.models.qwen3 import modeling_qwen3
    except ImportError as e:
        raise ImportError(f"qwen3_kernels.hf needs transformers with Qwen3 ({_SUPPORTED}): {e}") from None
    major = int(transformers.__version__.split(".")[0])
    missing = [name for name in ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward", "apply_rotary_pos_emb",
                                 "Qwen3Attention", "Qwen3MLP", "Qwen3RMSNorm", "Qwen3Model", "Qwen3ForCausalLM")
               if not hasattr(modeling_qwen3, name)]
    if major != 5 or missing:
        why = f"it lacks {', '.join(missing)}" if missing else "its Qwen3 code differs from what is patched here"
        raise RuntimeError(f"qwen3_kernels.hf supports {_SUPPORTED}; transformers {transformers.__version__} is "
                           f"installed and {why}")
    for name in _FORWARDS:  # the first look wins: later ones may see our own patches
        _ORIGINAL.setdefault(name, getattr(modeling_qwen3, name).forward)
    _ORIGINAL.setdefault("Qwen3PreTrainedModel.post_init", modeling_qwen3.Qwen3PreTrainedModel.post_init)
    global _modeling, _cache_name
    _modeling = modeling_qwen3
    # what this transformers calls the cache argument: ``cache`` (5.24 on) or ``past_key_values``
    _cache_name = "cache" if "cache" in inspect.signature(modeling_qwen3.Qwen3Model.forward).parameters \
        else "past_key_values"
    return modeling_qwen3


@functools.cache
def _qwen3_moe():
    """transformers' Qwen3-MoE modelling module with its own forwards taken, or None where this
    transformers has no Qwen3-MoE with stacked experts (then only dense Qwen3 is patched)."""
    _qwen3()
    try:
        from transformers.models.qwen3_moe import modeling_qwen3_moe as moe
    except ImportError:
        return None
    if not all(hasattr(moe, name) for name in _MOE_FORWARDS) or not hasattr(moe, "load_balancing_loss_func"):
        return None
    for name in _MOE_FORWARDS:
        _ORIGINAL.setdefault(name, getattr(moe, name).forward)
    # the experts' own loop, under the ExpertsInterface dispatch that would call us again
    _ORIGINAL.setdefault("Qwen3MoeExperts.loop", inspect.unwrap(moe.Qwen3MoeExperts.forward))
    _ORIGINAL.setdefault("Qwen3MoePreTrainedModel.post_init", moe.Qwen3MoePreTrainedModel.post_init)
    global _moe_modeling
    _moe_modeling = moe
    return moe


# set by _qwen3(), which apply_kernels and register_attention call before any forward of ours runs;
# the forwards read these globals rather than calling it, so torch.compile traces nothing of it
_modeling = None
_moe_modeling = None
_cache_name = "past_key_values"


# --- attention, through transformers' AttentionInterface -------------------------------------------

def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, H, Tq, D), key/value (B, Hkv, Tk, D) ->
    ((B, Tq, H, D), None). ``attention_mask`` is what ``attention_mask_interface`` made: None where
    nothing is padded."""
    B, H, Tq, D = query.shape
    Tk = key.shape[2]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if not (query.dtype == key.dtype == value.dtype) and torch.is_autocast_enabled(query.device.type):
        # Under autocast (fp32 weights, Trainer's bf16=True) q/k can come out fp32 beside a half v;
        # SDPA would cast all three to the autocast dtype, and so do we.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    sequences = None
    if kwargs.get("cu_seq_lens_q") is not None:
        if Tq != Tk:
            raise NotImplementedError(f"qwen3_kernels attention: cu_seq_lens_q with {Tk} keys for {Tq} queries (a "
                                      "cache over packed sequences) is not supported")
        cu_seqlens = kwargs["cu_seq_lens_q"].to(torch.int32)
        max_seqlen = kwargs.get("max_length_q")
        sequences = cu_seqlens, None if max_seqlen is None else int(max_seqlen)
    elif Tq == Tk > 1 and kwargs.get("position_ids") is not None and causal:
        sequences = _sequences_in(kwargs["position_ids"], B, Tq)
    reason = _sdpa_reason(query, key, value, attention_mask, dropout, sliding_window, kwargs)
    if reason:
        _log_once(f"attention runs transformers' SDPA path: {reason}")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        if sequences is not None and attention_mask is None:  # the packed examples must stay apart there too
            attention_mask = _packed_causal_mask(sequences[0], B, Tq)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, T, H, D)
    if sequences is None:
        out = ops.attention(q, k, v, causal=causal, softmax_scale=scaling)
    else:  # every row's sequences, one after another: (1, B * T, H, D)
        out = ops.attention(q.reshape(1, B * Tq, H, D), k.reshape(1, B * Tk, -1, D), v.reshape(1, B * Tk, -1, D),
                            causal=causal, softmax_scale=scaling, cu_seqlens=sequences[0], max_seqlen=sequences[1])
        out = out.view(B, Tq, H, D)
    return out, None


def _sdpa_reason(query, key, value, attention_mask, dropout, sliding_window, kwargs) -> str:
    """Why this call cannot run ``ops.attention`` exactly, or "" when it can."""
    if attention_mask is not None and kwargs.get("cu_seq_lens_q") is None:
        return ("the batch is padded (or the mask is not plain causal); for the kernels, pack it instead: "
                "transformers.DataCollatorWithFlattening")
    if dropout:
        return f"attention dropout ({dropout})"
    if sliding_window is not None:
        return f"sliding-window attention (window {sliding_window})"
    if kwargs.get("output_attentions"):
        return "output_attentions=True (the kernels never form the attention weights)"
    if not (query.dtype == key.dtype == value.dtype):
        return f"q, k, v dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})"
    return ""


def _packed_causal_mask(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """SDPA's boolean mask (B, 1, T, T) for sequences packed back to back over the rows (cu_seqlens
    over the B * T tokens): a token sees the earlier tokens of its own sequence only."""
    tokens = torch.arange(batch * length, device=cu_seqlens.device)
    sequence = torch.searchsorted(cu_seqlens[1:].to(torch.int64), tokens, right=True).view(batch, length, 1)
    position = tokens.view(batch, length, 1) % length
    return ((sequence == sequence.transpose(1, 2)) & (position >= position.transpose(1, 2)))[:, None]


_last_sequences: tuple = (None, -1, None)  # (weak reference to a position_ids tensor, its version, what it gave)


@torch.compiler.disable  # reads values from the device; under torch.compile this is one graph break
def _sequences_in(position_ids: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens, max_seqlen) of the sequences packed in ``position_ids`` (B or 1, T), rows one after
    another: a sequence starts at each row's first token and wherever the position does not go up by
    one (transformers' rule); None when every row holds a single sequence. One host sync, once per
    forward: the layers share the model's position_ids tensor, and the answer is kept for it."""
    global _last_sequences
    ref, version, found = _last_sequences
    if ref is not None and ref() is position_ids and version == position_ids._version:
        return found
    positions = position_ids.expand(batch, length)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    flat = starts.flatten()
    if int(flat.sum()) == batch:
        found = None
    else:
        index = torch.arange(flat.numel() + 1, device=flat.device, dtype=torch.int32)
        cu_seqlens = torch.cat([index[:-1][flat], index[-1:]])
        found = cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    _last_sequences = (weakref.ref(position_ids), position_ids._version, found)
    return found


def attention_mask_interface(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask function transformers calls once per forward for ``"qwen3_kernels"``: None when no
    token is padded (the kernels need no mask: causal, with packed sequences found separately), else
    SDPA's boolean mask, for the SDPA path that padded batches take."""
    from transformers.masking_utils import sdpa_mask
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_attention() -> None:
    """Registers ``"qwen3_kernels"`` with transformers (idempotent); ``apply_kernels`` calls it."""
    _qwen3()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, attention_mask_interface)


# --- the patched forwards ---------------------------------------------------------------------------

def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight, dtype = self.weight, hidden_states.dtype
    if torch.promote_types(weight.dtype, dtype) == dtype:
        return ops.rms_norm(hidden_states, weight, self.variance_epsilon)
    # transformers returns weight * normed.to(input dtype) in the promoted dtype: an fp32 weight (autocast
    # on an fp32 model) makes half activations fp32. The kernel normalises (unit weight) and the weight
    # multiplies in that dtype, as there.
    unit = torch.ones_like(weight, dtype=dtype)
    return weight * ops.rms_norm(hidden_states, unit, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.config.hidden_act != "silu":
        return _ORIGINAL[type(self).__name__](self, x)
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                       attention_mask: torch.Tensor | None = None, past_key_values=None, cache=None, **kwargs):
    """transformers' Qwen3Attention.forward with q/k RMSNorm and RoPE in one kernel; the cache and
    the attention function are transformers' (``"qwen3_kernels"`` or whatever the config names)."""
    m = _modeling
    cache = cache if cache is not None else past_key_values
    B, T = hidden_states.shape[:2]
    q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)                # (B, T, H, D)
    k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)                # (B, T, Hkv, D)
    v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)
    cos, sin = position_embeddings                                               # (B or 1, T, D)
    norms = (self.q_norm, self.k_norm)
    if all(type(n).__name__ in ("Qwen3RMSNorm", "Qwen3MoeRMSNorm") for n in norms) \
            and self.q_norm.variance_epsilon == self.k_norm.variance_epsilon \
            and q.dtype == k.dtype:  # norm weights and cos/sin may be fp32 beside half q/k (autocast)
        q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.variance_epsilon)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                              # (B, H, T, D)
    else:
        q, k = m.apply_rotary_pos_emb(self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), cos, sin)
    v = v.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    attend = m.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, m.eager_attention_forward)
    out, weights = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                          scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
    return self.o_proj(out.reshape(B, T, -1).contiguous()), weights


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None,
                       skip_logits: bool | None = None, **kwargs):
    """transformers' Qwen3ForCausalLM.forward, but the training loss comes from the hidden states
    through ``ops.linear_cross_entropy`` and no logits are built (``skip_logits``, default: training
    with labels)."""
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **{_cache_name: cache if cache is not None else past_key_values}, **kwargs)
    logits, loss = _logits_and_loss(self, outputs.last_hidden_state, labels, logits_to_keep, skip_logits, kwargs)
    output = _modeling.CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                              attentions=outputs.attentions,
                                              **{_cache_name: getattr(outputs, _cache_name)})
    return _returned(self, output, return_dict)


def _moe_causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                           inputs_embeds=None, labels=None, use_cache=None, output_router_logits=None,
                           logits_to_keep=0, cache=None, skip_logits: bool | None = None, **kwargs):
    """transformers' Qwen3MoeForCausalLM.forward with the fused loss of ``_causal_lm_forward``; where
    router logits are requested (the argument, else the config's ``output_router_logits``), the
    load-balancing loss is transformers' own ``load_balancing_loss_func`` over them, added times
    ``router_aux_loss_coef`` to the loss when there are labels."""
    return_dict = kwargs.pop("return_dict", None)
    if output_router_logits is None:
        output_router_logits = self.config.output_router_logits
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_router_logits=output_router_logits,
                         **{_cache_name: cache if cache is not None else past_key_values}, **kwargs)
    logits, loss = _logits_and_loss(self, outputs.last_hidden_state, labels, logits_to_keep, skip_logits, kwargs)
    aux_loss = None
    if output_router_logits:
        aux_loss = _moe_modeling.load_balancing_loss_func(outputs.router_logits, self.num_experts,
                                                          self.num_experts_per_tok, attention_mask)
        if loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
    output = _moe_modeling.MoeCausalLMOutputWithPast(
        loss=loss, aux_loss=aux_loss, logits=logits, hidden_states=outputs.hidden_states,
        attentions=outputs.attentions, router_logits=outputs.router_logits,
        **{_cache_name: getattr(outputs, _cache_name)})
    return _returned(self, output, return_dict)


def _returned(model, output, return_dict):
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return output if return_dict else output.to_tuple()


def _logits_and_loss(self, hidden, labels, logits_to_keep, skip_logits, kwargs):
    """(logits or None, loss or None) of a causal LM's last hidden states (B, T, C), as transformers'
    forward computes them, the training loss fused (no logits) where ``skip_logits``."""
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    hidden = hidden[:, keep, :]
    shift_labels = kwargs.get("shift_labels")
    has_labels = labels is not None or shift_labels is not None
    if skip_logits is None:
        skip_logits = self.training and has_labels
    if skip_logits and not has_labels:
        raise ValueError("skip_logits=True needs labels (or shift_labels): without logits there is nothing else to "
                         "return")
    head = self.lm_head
    fits = type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == hidden.dtype
    if skip_logits and fits:
        return None, _fused_causal_lm_loss(hidden, head.weight, labels, shift_labels, kwargs.get("num_items_in_batch"),
                                           kwargs.get("ignore_index", IGNORE_INDEX))
    if skip_logits:
        _log_once("the loss builds the logits: the LM head is not a plain bias-free nn.Linear in the hidden "
                  "states' dtype (a PEFT-wrapped head, or autocast)")
    logits = self.lm_head(hidden)
    loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs) \
        if has_labels else None
    return logits, loss


# --- the MoE block: router and experts ----------------------------------------------------------------

def _router_forward(self, hidden_states: torch.Tensor):
    """transformers' Qwen3MoeTopKRouter.forward: (router logits (N, E), weights (N, k), expert ids
    (N, k)), the softmax + top-k + renormalisation in ``ops.moe_route``."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)                   # (N, C)
    router_logits = F.linear(hidden_states, self.weight)                         # (N, E)
    weights, expert_ids = ops.moe_route(router_logits, self.top_k, self.norm_topk_prob)
    return router_logits, weights, expert_ids


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                    ) -> torch.Tensor:
    """The ``"qwen3_kernels"`` experts implementation (transformers' ``ExpertsInterface`` contract):
    hidden (N, C), expert ids and weights (N, k) -> (N, C) through ``ops.moe_experts`` on the
    module's stacked ``gate_up_proj (E, 2I, C)`` and ``down_proj (E, C, I)``. Layouts or dtypes the
    kernel does not take run transformers' own loop."""
    reason = _experts_reason(self, hidden_states, top_k_weights)
    if reason:
        _log_once(f"the MoE experts run transformers' loop: {reason}")
        return _ORIGINAL["Qwen3MoeExperts.loop"](self, hidden_states, top_k_index, top_k_weights)
    return ops.moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)


def _experts_reason(module, hidden, weights) -> str:
    """Why these experts cannot run ``ops.moe_experts`` exactly, or "" when they can."""
    act = getattr(module.config, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} (the kernel's activation is SiLU)"
    for flag, fine in (("has_bias", False), ("is_transposed", False), ("is_concatenated", True), ("has_gate", True)):
        if getattr(module, flag, fine) != fine:
            return f"{flag}={not fine} (the kernel takes concatenated [gate; up] weights without bias)"
    gate_up, down = module.gate_up_proj, module.down_proj
    if not isinstance(gate_up, torch.Tensor) or type(gate_up) not in (torch.Tensor, torch.nn.Parameter):
        return f"gate_up_proj is a {type(gate_up).__name__}"
    if not (hidden.dtype == weights.dtype == gate_up.dtype == down.dtype):
        return (f"dtypes differ (hidden {hidden.dtype}, routing weights {weights.dtype}, gate_up_proj {gate_up.dtype}, "
                f"down_proj {down.dtype})")
    return ""


def _fused_causal_lm_loss(hidden, weight, labels, shift_labels, num_items_in_batch, ignore_index):
    """transformers' ForCausalLMLoss (shift, ignore_index, mean or sum / num_items_in_batch) without logits."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]           # t predicts labels[t + 1]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels give {tuple(shift_labels.shape)} targets for {tuple(hidden.shape[:-1])} hidden "
                         "states: with logits_to_keep, pass labels (or shift_labels) for the kept positions only")
    shift_labels = shift_labels.to(hidden.device)
    if num_items_in_batch is None:
        return ops.linear_cross_entropy(hidden, weight, shift_labels, ignore_index, "mean")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    return ops.linear_cross_entropy(hidden, weight, shift_labels, ignore_index, "sum") / num_items_in_batch


# --- applying and removing ---------------------------------------------------------------------------

# class -> (the apply_kernels switch that puts it in, the forward it puts in); attention itself needs
# no forward of ours: transformers' Qwen3Attention.forward calls the registered function
_FORWARDS = {"Qwen3RMSNorm": ("rms_norm", _rms_norm_forward), "Qwen3MLP": ("swiglu", _mlp_forward),
             "Qwen3Attention": ("qk_norm_rope", _attention_forward),
             "Qwen3ForCausalLM": ("linear_cross_entropy", _causal_lm_forward)}
# Qwen3-MoE: the same modules under its names, plus the MoE block's router and experts (the experts
# through transformers' ExpertsInterface where it has one: see _patch_experts)
_MOE_FORWARDS = {"Qwen3MoeRMSNorm": ("rms_norm", _rms_norm_forward), "Qwen3MoeMLP": ("swiglu", _mlp_forward),
                 "Qwen3MoeAttention": ("qk_norm_rope", _attention_forward),
                 "Qwen3MoeForCausalLM": ("linear_cross_entropy", _moe_causal_lm_forward),
                 "Qwen3MoeTopKRouter": ("moe", _router_forward), "Qwen3MoeExperts": ("moe", experts_forward)}
_ORIGINAL: dict[str, object] = {}       # transformers' own methods, taken before any patch
_CLASS_PATCHES: dict[str, tuple] = {}   # what apply_kernels() put into transformers' classes: name -> (class, attr)


def _experts_interface():
    """transformers' ExpertsInterface with ``"qwen3_kernels"`` registered, or None where this
    transformers has none (its experts' forward is then patched instead)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return None
    ExpertsInterface.register(ATTENTION, experts_forward)
    return ExpertsInterface


def apply_kernels(model: torch.nn.Module | None = None, *, rms_norm: bool = True, qk_norm_rope: bool = True,
                  swiglu: bool = True, attention: bool = True, linear_cross_entropy: bool = True, moe: bool = True):
    """Puts the kernels into transformers' Qwen3 and Qwen3-MoE.

    With no ``model``: patches the classes, so every Qwen3 / Qwen3-MoE model built afterwards (by
    ``from_pretrained`` too) uses the kernels and, with ``attention``, the ``"qwen3_kernels"``
    attention whatever ``attn_implementation`` it was given (``attention=False`` keeps that); with
    ``moe``, the ``"qwen3_kernels"`` experts implementation likewise.
    With a model (``Qwen3ForCausalLM``, ``Qwen3Model``, ``Qwen3MoeForCausalLM`` or ``Qwen3MoeModel``,
    possibly wrapped by PEFT): patches every such module in it, the attention's ``q_norm``/``k_norm``
    included, and switches its attention (and experts) implementation to ``"qwen3_kernels"``.
    Parameters and the state dict are untouched. Returns ``model``; ``remove_kernels()`` undoes the
    class patch."""
    families = [(_qwen3(), _FORWARDS)]
    if _qwen3_moe() is not None:
        families.append((_moe_modeling, _MOE_FORWARDS))
    wanted = dict(rms_norm=rms_norm, qk_norm_rope=qk_norm_rope, swiglu=swiglu, attention=attention,
                  linear_cross_entropy=linear_cross_entropy, moe=moe)
    if attention:
        register_attention()
    interface = _experts_interface() if moe else None
    if model is None:
        for module, forwards in families:
            for name, (part, forward) in forwards.items():
                if wanted[part] and not (name == "Qwen3MoeExperts" and interface is not None):
                    _patch_class(module, name, "forward", forward)
            prefix = "Qwen3Moe" if module is _moe_modeling else "Qwen3"
            experts = interface is not None and module is _moe_modeling
            if attention or experts:
                _patch_class(module, f"{prefix}PreTrainedModel", "post_init",
                             functools.partial(_post_init, f"{prefix}PreTrainedModel.post_init", attention, experts))
        return None
    roots = tuple(getattr(module, f"{prefix}{kind}") for module, _ in families
                  for prefix in (("Qwen3Moe" if module is _moe_modeling else "Qwen3"),)
                  for kind in ("Model", "ForCausalLM"))
    found = [mod for mod in model.modules() if isinstance(mod, roots)]
    if not found:
        raise TypeError(f"apply_kernels patches transformers' Qwen3 and Qwen3-MoE (Qwen3ForCausalLM, Qwen3Model, "
                        f"Qwen3MoeForCausalLM or Qwen3MoeModel, bare or inside PEFT); got a {type(model).__name__} "
                        "with no Qwen3 model inside")
    for module in model.modules():
        for family, forwards in families:
            for name, (part, forward) in forwards.items():
                if not (wanted[part] and type(module) is getattr(family, name)):
                    continue
                if name == "Qwen3MoeExperts" and interface is not None:
                    module.config._experts_implementation = ATTENTION
                else:
                    module.forward = types.MethodType(forward, module)
    for mod in found:
        if attention:
            mod.config._attn_implementation = ATTENTION
        if interface is not None and _moe_modeling is not None and isinstance(mod, (
                _moe_modeling.Qwen3MoeModel, _moe_modeling.Qwen3MoeForCausalLM)):
            mod.config._experts_implementation = ATTENTION
    return model


def _patch_class(module, cls_name: str, attr: str, value) -> None:
    name = cls_name if attr == "forward" else f"{cls_name}.{attr}"
    setattr(getattr(module, cls_name), attr, value if attr == "forward" else _bound(value))
    _CLASS_PATCHES[name] = (getattr(module, cls_name), attr)


def _bound(fn):
    """A plain function (a partial is no descriptor), so it binds ``self`` as a method."""
    def method(self, *args, **kwargs):
        return fn(self, *args, **kwargs)
    return method


def _post_init(original: str, attention: bool, experts: bool, self) -> None:
    _ORIGINAL[original](self)
    if attention:
        self.config._attn_implementation = ATTENTION
    if experts:
        self.config._experts_implementation = ATTENTION


def remove_kernels() -> None:
    """Undoes ``apply_kernels()`` on transformers' classes (models built since keep their patched
    config's attention and experts implementation; set ``model.config._attn_implementation`` /
    ``_experts_implementation`` to change it)."""
    for name in list(_CLASS_PATCHES):
        cls, attr = _CLASS_PATCHES.pop(name)
        setattr(cls, attr, _ORIGINAL[name])
