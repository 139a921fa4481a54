"""Qwen3, top to bottom: token embedding -> N x [pre-norm GQA attention, pre-norm SwiGLU FFN] ->
final RMSNorm -> LM head (tied to the embedding in the small sizes). In Qwen3-MoE (30B-A3B, 235B-A22B)
the FFN of each sparse layer is a Mixture of Experts: a router picks k of E SwiGLU experts per token
and the FFN's output is their weighted sum (``MoE``); training adds a load-balancing loss.

Every computation goes through ``qwen3_kernels.ops``: ``fused=True`` uses the dispatcher there
(Triton kernels where the device supports them), ``fused=False`` the eager reference. The model
itself never looks at which backend runs.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import Config, rope_frequencies

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # a label that counts for nothing in the loss (transformers' convention)


def calculate_sin_cos(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``positions`` (shape (T,) or (B, T)): returns ``(sin, cos)`` of shape
    (..., T, head_dim) in ``dtype``. Angles are computed in fp32 and cast last, as transformers does."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # (..., T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, D), half-split layout
    return (angles.sin() * scaling).to(dtype), (angles.cos() * scaling).to(dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """The half-split rotation RoPE pairs with sin: ``[x1, x2] -> [-x2, x1]``."""
    return ops.reference.rotate_half(x)


class Attend(NamedTuple):
    """Which keys each query of one forward sees besides causality: a KV cache's filled length per
    sequence (``kv_lens`` (B,)), or packed sequences, each seeing only itself (``cu_seqlens``
    (n + 1,) int32 prefix sums of their lengths over the B * T tokens, rows one after another,
    ``max_seqlen`` the longest); by default, its row."""
    kv_lens: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None


class KVCache:
    """Preallocated keys and values of every layer, (num_layers, B, max_len, Hkv, D) each, plus how
    many positions of each sequence are filled (``lens``, (B,) int32). Static shapes, so a decode
    step can be captured in a CUDA graph; a forward pass writes its tokens at ``lens`` and the model
    advances ``lens`` after the last layer."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor):
        self.k, self.v, self.lens = k, v, lens

    @classmethod
    def empty(cls, config: Config, batch_size: int, max_len: int, *, device=None, dtype=torch.float32) -> "KVCache":
        shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch_size, device=device, dtype=torch.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of sequences [start, stop): writes through it land in this cache."""
        return KVCache(self.k[:, start:stop], self.v[:, start:stop], self.lens[start:stop])


class RMSNORM(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, kernels=ops.reference):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)`` in one fused pass."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FFN(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Config, kernels=ops.reference):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.ops = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if plain_linears(self.gate_proj, self.up_proj):
            # gate and up in one GEMM (their weights share one buffer), read back as two strided halves
            gate, up = self.ops.packed_linear(x, (self.gate_proj.weight, self.up_proj.weight)).chunk(2, dim=-1)
        else:  # a wrapped projection (a LoRA adapter on it) runs its own forward
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.ops.swiglu(gate, up))


def plain_linears(*modules: nn.Module) -> bool:
    """Whether each projection is a plain ``nn.Linear``, whose weights ``packed_linear`` may multiply
    together; a module that wraps one (PEFT's LoRA layer: base + adapter) must run its own forward,
    which the packed path would skip."""
    return all(type(m) is nn.Linear for m in modules)


class Experts(nn.Module):
    """E SwiGLU experts, stacked so that one kernel sees each projection whole: ``gate_up_proj``
    (E, 2I, C), the gate's I rows then the up's, and ``down_proj`` (E, C, I) (transformers 5's layout)."""

    def __init__(self, config: Config):
        super().__init__()
        E, C, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, I))

    def extra_repr(self) -> str:
        E, I2, C = self.gate_up_proj.shape
        return f"experts={E}, hidden={C}, intermediate={I2 // 2}"


class Routing(NamedTuple):
    """What one MoE layer's router did over its N tokens, for the load-balancing loss: the sum over
    the tokens of the softmax over all E experts (``prob_sum`` (E,) fp32, differentiable) and how
    many of the N x k (token, slot) assignments each expert received (``counts`` (E,) int64)."""
    prob_sum: torch.Tensor
    counts: torch.Tensor


class MoE(nn.Module):
    """Sparse Mixture of Experts: the router (``gate``) scores the E experts for each token, the top k
    (softmax over all E in fp32, renormalised over the k if ``norm_topk_prob``) run, and the output
    is their weighted sum. No shared expert."""

    def __init__(self, config: Config, kernels=ops.reference):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config)
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.ops = kernels

    def forward(self, x: torch.Tensor, route: bool = False) -> tuple[torch.Tensor, Routing | None]:
        """(B, T, C) -> (B, T, C), and with ``route`` this layer's ``Routing`` (else None)."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)                                           # every token on its own: (N, C)
        logits = self.gate(x)                                            # (N, E) in the activations' dtype
        weights, expert_ids = self.ops.moe_route(logits, self.top_k, self.norm_topk_prob)  # (N, k) each
        out = self.ops.moe_experts(x, expert_ids, weights, self.experts.gate_up_proj, self.experts.down_proj)
        routing = None
        if route:  # the load-balancing loss's inputs, asked for by the model's forward
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)   # the raw logits, softmaxed once
            ids = expert_ids.flatten()
            counts = torch.zeros(logits.shape[1], dtype=torch.int64, device=ids.device)
            routing = Routing(probs.sum(dim=0), counts.scatter_add_(0, ids, torch.ones_like(ids)))
        return out.view(B, T, C), routing


class RouterStats(NamedTuple):
    """The routing of one forward over all MoE layers (``QWEN.forward(..., return_aux=True)``).

    ``aux_loss``: transformers' ``load_balancing_loss_func`` (Switch Transformer): with f_e the number
    of tokens sent to expert e per token (over every MoE layer together: the f_e sum to k) and P_e its
    mean router probability over the same tokens and layers, ``E * sum_e f_e * P_e``: k for an even
    router with uniform probabilities, up to E for one that sends every token to the same k experts
    with all its probability. A () fp32 tensor carrying the gradient to the routers (through P; the
    counts are not differentiable). Every token of ``input_ids`` counts (there is no padding: packed
    sequences are padding-free; labels of -100 do not mask it, as in transformers).

    ``tokens_per_expert``: (moe_layers, E) int64, how many tokens each layer sent to each expert."""
    aux_loss: torch.Tensor
    tokens_per_expert: torch.Tensor

    def expert_load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(largest, smallest) share of a layer's tokens that one expert received; see ``expert_load``."""
        return expert_load(self.tokens_per_expert)


def expert_load(tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest and the smallest share of its layer's N x k routed (token, slot) assignments that an
    expert received, over every expert of every MoE layer, from (moe_layers, E) counts (sum them over
    micro-batches or ranks first). Both are 1/E when the routing is even; the largest is at most 1/k
    (every token chose that expert) and the smallest 0 for an idle expert. Two () fp32 tensors."""
    counts = tokens_per_expert.to(torch.float32)
    share = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)       # (layers, E), each row sums to 1
    return share.max(), share.min()


def load_balancing_loss(routing: list[Routing], top_k: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` over the layers' ``Routing``: the assignment shares
    and mean probabilities are taken over all layers' tokens together (sums over the layers, divided
    by layers x tokens), then ``E * sum_e f_e * P_e``."""
    prob_sum, counts = routing[0].prob_sum, routing[0].counts.to(torch.float32)
    for r in routing[1:]:
        prob_sum, counts = prob_sum + r.prob_sum, counts + r.counts.to(torch.float32)
    rows = counts.sum() / top_k                                          # layers x tokens
    return (counts / rows * (prob_sum / rows)).sum() * prob_sum.shape[0]


class GQA(nn.Module):
    """Causal grouped-query attention with per-head RMSNorm of q and k before RoPE."""

    def __init__(self, config: Config, layer: int = 0, kernels=ops.reference):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        C, D, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(C, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(C, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(C, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, C, bias=bias)  # transformers: o_proj too has a bias
        self.q_norm = RMSNORM(D, config.rms_norm_eps, kernels)
        self.k_norm = RMSNORM(D, config.rms_norm_eps, kernels)
        self.ops = kernels

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, attend: Attend = Attend()) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if plain_linears(*projections):
            qkv = self.ops.packed_linear(x, [p.weight for p in projections], [p.bias for p in projections])
        else:  # a wrapped projection (a LoRA adapter on it) runs its own forward
            qkv = torch.cat([p(x) for p in projections], dim=-1)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)          # one GEMM, three strided views
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        qw, kw, eps = self.q_norm.weight, self.k_norm.weight, self.q_norm.eps
        if cache is None:
            q, k = self.ops.qk_norm_rope(q, k, qw, kw, cos, sin, eps)
        else:  # the new keys (normed, rotated) and values go straight into the cache at `positions`
            k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]  # (B, max_len, Hkv, D)
            q = self.ops.qk_norm_rope_into_cache(q, k, v, qw, kw, cos, sin, k_cache, v_cache, positions, eps)
            k, v = k_cache, v_cache  # attend over everything cached so far, these tokens included
        if attend.cu_seqlens is not None:  # packed sequences, the rows back to back: (1, B * T, ., D)
            q, k, v = q.reshape(1, B * T, H, D), k.reshape(1, B * T, Hkv, D), v.reshape(1, B * T, Hkv, D)
        out = self.ops.attention(q, k, v, causal=True, kv_lens=attend.kv_lens, cu_seqlens=attend.cu_seqlens,
                                 max_seqlen=attend.max_seqlen)             # (B, T, H, D) or (1, B * T, H, D)
        return self.o_proj(out.reshape(B, T, H * D))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``. Each residual add
    is fused into the norm that follows it, so a block hands the next one its FFN output and the
    residual stream separately: ``(ffn_out, x, routing)``, and the next block's first norm adds them.
    The FFN is a Mixture of Experts in the MoE layers (``config.is_moe_layer``); asked to ``route``, an
    MoE block also returns its router's ``Routing`` (else None). It is an output, not a side effect:
    wrappers see it as they see the block's other outputs (FSDP2 rebuilds a block's input lists to
    cast them, and hooks the outputs' gradients to gather the weights for the backward)."""

    def __init__(self, config: Config, layer: int = 0, kernels=ops.reference):
        super().__init__()
        self.attn_norm = RMSNORM(config.hidden_size, config.rms_norm_eps, kernels)
        self.attn = GQA(config, layer, kernels)
        self.ffn_norm = RMSNORM(config.hidden_size, config.rms_norm_eps, kernels)
        self.sparse = config.is_moe_layer(layer)
        self.ffn = MoE(config, kernels) if self.sparse else FFN(config, kernels)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                attend: Attend = Attend(), route: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, Routing | None]:
        if residual is None:  # the first block: x is the embedding, the stream starts here
            h, residual = self.attn_norm(x), x
        else:
            h, residual = self.attn_norm(x, residual=residual)  # residual += x; h = norm(residual)
        attn_out = self.attn(h, cos, sin, cache, positions, attend)
        h, residual = self.ffn_norm(attn_out, residual=residual)
        if self.sparse:
            out, routing = self.ffn(h, route)
            return out, residual, routing
        return self.ffn(h), residual, None


class LMHead(nn.Linear):
    """Vocabulary logits ``x @ W.T``; given ``targets``, the cross-entropy straight from the hidden
    states (``ops.linear_cross_entropy``: fused, it never builds the (tokens x vocab) logits). The
    weight is read here, inside this module's forward, so a sharding wrapper (FSDP2) that gathers
    parameters around a module's forward hands the loss the whole weight."""

    def __init__(self, config: Config, kernels=ops.reference):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)
        self.ops = kernels

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        if targets is None:
            return super().forward(x)                                    # (B, T, vocab)
        return self.ops.linear_cross_entropy(x, self.weight, targets, IGNORE_INDEX, reduction)


class QWEN(nn.Module):
    def __init__(self, config: Config | None = None, *, fused: bool = False):
        super().__init__()
        self.config = config = config if config is not None else Config()
        self.fused = fused
        kernels = ops if fused else ops.reference
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, layer, kernels) for layer in range(config.num_layers))
        self.norm = RMSNORM(config.hidden_size, config.rms_norm_eps, kernels)
        self.lm_head = LMHead(config, kernels)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight
        inv_freq, self.rope_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._warned_devices: set = set()
        self.apply(self._init_weights)
        self.pack_projections()

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) and friends must not round the rotary frequencies: they stay fp32, as
        # transformers computes them, whatever dtype the weights move to.
        super()._apply(fn, recurse)
        # to_empty() on a meta model makes new Parameters, one per module: tie the head again
        if self.config.tie_word_embeddings and self.lm_head.weight is not self.embeddings.weight:
            self.lm_head.weight = self.embeddings.weight
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = rope_frequencies(self.config)[0].to(self.inv_freq.device)
        self.pack_projections()  # a move gives every parameter its own storage
        return self

    def pack_projections(self) -> "QWEN":
        """Puts each block's q/k/v and gate/up weights back to back in one buffer, so each group runs
        as one GEMM (``ops.packed_linear``); parameters and their names are unchanged."""
        for block in self.blocks:
            attn, ffn = block.attn, block.ffn
            ops.pack_parameters([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            if not block.sparse:  # the experts' gate and up are stacked in one parameter already
                ops.pack_parameters([ffn.gate_proj.weight, ffn.up_proj.weight])
        return self

    def reset_parameters(self) -> "QWEN":
        """Fresh random weights (normal(0, 0.02), zero biases, unit norm gains) and the rotary
        frequencies: what a model built on the meta device needs after ``to_empty``, so a large
        random model is allocated once, in its final dtype, on its final device."""
        for module in self.modules():
            if isinstance(module, RMSNORM):
                nn.init.ones_(module.weight)
        self.apply(self._init_weights)
        self.inv_freq = rope_frequencies(self.config)[0].to(self.inv_freq.device)
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, Experts):  # stacked Linear weights: initialised as the Linears are
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=0.02)
            nn.init.normal_(module.down_proj, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
                labels: torch.Tensor | None = None, num_items_in_batch=None, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                output_router_logits: bool | None = None, return_aux: bool = False):
        """Logits (B, T, vocab) for token ids (B, T); (B, 1, vocab) with ``last_only``. With a
        ``cache``, the tokens continue each cached sequence: they are written at positions
        ``cache.lens`` onward and attend to everything before them.

        With ``labels`` (B, T), the next-token loss instead, a scalar, as transformers computes it:
        position t is scored against ``labels[:, t + 1]`` (the shift happens here), labels of -100
        count for nothing, and the result is the mean over the counted labels, or their sum divided
        by ``num_items_in_batch`` when given (the count over a whole accumulated batch). Fused, the
        logits are never built.

        ``position_ids`` (B, T) sets each token's rotary position, and, as in transformers, where the
        sequences are: one starts at each row's first token and wherever the position does not go up by
        one. A row 3, 4, ..., 18 is one sequence continued from position 3; a padding-free batch
        (``input_ids`` (1, total) holding several examples back to back) restarts the positions at 0
        for each example, and each example attends only to itself, getting the logits it would get
        alone. Instead of position_ids, packed examples can be given as ``cu_seqlens`` ((n + 1,) int32
        prefix sums of the example lengths in the one row) and ``max_seqlen``, which avoids reading
        them from the device. The model's context (``max_position_embeddings``) limits each example,
        not the row that packs them.

        Qwen3-MoE: with ``labels`` and ``output_router_logits`` (default ``config.output_router_logits``,
        false in the released files), the loss is ``lm_loss + config.router_aux_loss_coef * aux_loss``,
        the load-balancing loss of all MoE layers (``RouterStats``), as transformers'
        ``Qwen3MoeForCausalLM`` adds it. ``return_aux=True`` returns ``(logits or loss, RouterStats)``
        instead: that aux loss (added to the loss or not) and the tokens each layer sent to each expert,
        for logging (``RouterStats.expert_load()``)."""
        checking = not torch.compiler.is_compiling()
        sparse = any(block.sparse for block in self.blocks)
        if checking:
            self._check_input(input_ids, cache, position_ids, cu_seqlens)
            if labels is not None:
                self._check_labels(input_ids, labels, cache, last_only)
            self._check_router_outputs(output_router_logits, return_aux, sparse)
        positions, attend = position_ids, Attend()
        if cu_seqlens is not None or position_ids is not None:
            positions, attend = self._sequences(input_ids, position_ids, cu_seqlens, max_seqlen)
            if checking:
                self._check_context(input_ids, position_ids, attend)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        add_aux = sparse and labels is not None and output_router_logits
        routing = [] if add_aux or return_aux else None  # each MoE layer's Routing, filled by _forward
        out = self._forward(input_ids, cache, last_only, labels, num_items_in_batch, positions, attend, routing)
        if routing is None:
            return out
        stats = RouterStats(load_balancing_loss(routing, self.config.num_experts_per_tok),
                            torch.stack([r.counts for r in routing]))  # (moe_layers, E)
        if add_aux:
            out = out + self.config.router_aux_loss_coef * stats.aux_loss
        return (out, stats) if return_aux else out

    def _sequences(self, input_ids, position_ids, cu_seqlens, max_seqlen) -> tuple[torch.Tensor, Attend]:
        """(positions, Attend) for position_ids or cu_seqlens: where each sequence starts, and each
        token's rotary position (read from position_ids, else its place in its own example)."""
        if position_ids is not None:
            position_ids = position_ids.expand_as(input_ids)  # (1, T): the same positions for every row
        if cu_seqlens is None:
            # transformers' rule: a sequence starts at each row's first token and wherever the position
            # does not go up by one (a restart at 0 for each packed example)
            B, T = position_ids.shape
            starts = torch.ones_like(position_ids, dtype=torch.bool)
            starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
            starts = torch.nonzero(starts.flatten()).flatten()
            if starts.numel() == B:  # one sequence a row: plain causal attention at these positions
                return position_ids, Attend()
            cu_seqlens = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
        if position_ids is None:  # each token's place in its own example
            tokens = torch.arange(input_ids.shape[1], device=input_ids.device)
            example = torch.searchsorted(cu_seqlens[1:].to(torch.int64), tokens, right=True)
            position_ids = (tokens - cu_seqlens.to(torch.int64)[example])[None]
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return position_ids, Attend(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def _forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                 labels: torch.Tensor | None = None, num_items_in_batch=None, positions: torch.Tensor | None = None,
                 attend: Attend = Attend(), routing: list[Routing] | None = None):
        B, T = input_ids.shape
        x = self.embeddings(input_ids)                                   # (B, T, C)
        if positions is None:
            steps = torch.arange(T, device=input_ids.device)
            positions = steps if cache is None else cache.lens[:, None] + steps  # (T,) or (B, T)
        sin, cos = calculate_sin_cos(positions, self.inv_freq, self.rope_scaling, x.dtype)  # (.., T, D)
        if cache is not None:
            attend = Attend(kv_lens=cache.lens + T)                      # (B,) once these tokens are in
        residual = None
        for block in self.blocks:
            x, residual, routed = block(x, residual, cos, sin, cache, positions, attend, routing is not None)
            if routed is not None:
                routing.append(routed)
        if cache is not None:
            cache.lens.copy_(attend.kv_lens)
        if last_only:
            x, residual = x[:, -1:], residual[:, -1:]
        x, _ = self.norm(x, residual=residual)                           # the last block's residual add, fused
        if labels is None:
            return self.lm_head(x)                                       # (B, T, vocab)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)       # (B, T): t predicts labels[t + 1]
        if num_items_in_batch is None:
            return self.lm_head(x, targets)                              # mean over the counted labels
        return self.lm_head(x, targets, reduction="sum") / num_items_in_batch

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds the model's max context "
                             f"(max_position_embeddings={self.config.max_position_embeddings})")
        w = self.embeddings.weight
        return KVCache.empty(self.config, batch_size, max_len, device=w.device, dtype=w.dtype)

    def _check_input(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                     position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dtype not in (torch.int64, torch.int32):  # uint8/int16 cannot hold a real vocabulary
            raise TypeError(f"input_ids must be int64 or int32 token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        T, limit = input_ids.shape[1], self.config.max_position_embeddings
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids is empty: batch size is 0")
        if T == 0:
            raise ValueError("input_ids is empty: seq_len is 0")
        if cache is not None and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("a KVCache is for inference: it is written in place, which autograd cannot "
                               "differentiate through; run cached forwards under torch.no_grad() or "
                               "torch.inference_mode()")
        if position_ids is not None or cu_seqlens is not None:
            self._check_sequences(input_ids, cache, position_ids, cu_seqlens)
        elif T > limit:  # with position_ids or cu_seqlens, each sequence is checked (_check_context)
            raise ValueError(f"sequence length {T} exceeds the model's max context "
                             f"(max_position_embeddings={limit})")
        if cache is not None:
            if cache.k.shape[1] != input_ids.shape[0]:
                raise ValueError(f"input_ids has batch {input_ids.shape[0]} but the cache holds "
                                 f"{cache.k.shape[1]} sequences")
            filled = int(cache.lens.max())
            if filled + T > cache.max_len:
                raise ValueError(f"{T} more tokens after {filled} cached ones exceed the cache length "
                                 f"{cache.max_len}")
        lo, hi = input_ids.min().item(), input_ids.max().item()
        if lo < 0:
            raise ValueError(f"input_ids contains negative token id {lo}")
        if hi >= self.config.vocab_size:
            raise ValueError(f"input_ids contains token id {hi} >= vocab_size {self.config.vocab_size}")
        if self.fused:
            self._warn_fallbacks(input_ids.device, self.embeddings.weight.dtype)

    @staticmethod
    def _check_sequences(input_ids, cache, position_ids, cu_seqlens) -> None:
        if cache is not None:
            raise ValueError("position_ids and cu_seqlens cannot continue a KV cache: the cache places the new "
                             "tokens after the cached ones (cache.lens onward)")
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"position_ids must be an int64 (or int32) tensor, got "
                                f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
            if position_ids.shape not in (input_ids.shape, (1, input_ids.shape[1])):
                raise ValueError(f"position_ids shape {tuple(position_ids.shape)} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)} (or be (1, {input_ids.shape[1]}): one row for all)")
            if position_ids.device != input_ids.device:
                raise ValueError(f"position_ids are on {position_ids.device}, input_ids on {input_ids.device}")
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs examples into one row: input_ids must be (1, total), got "
                             f"{tuple(input_ids.shape)}")

    def _check_context(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, attend: Attend) -> None:
        """The context limits each sequence (each packed example, not the row that packs them), and
        the positions it reaches."""
        limit = self.config.max_position_embeddings
        if attend.cu_seqlens is not None and attend.max_seqlen > limit:
            raise ValueError(f"a packed example of {attend.max_seqlen} tokens exceeds the model's max context "
                             f"(max_position_embeddings={limit})")
        if attend.cu_seqlens is None and input_ids.shape[1] > limit:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's max context "
                             f"(max_position_embeddings={limit})")
        if position_ids is not None:
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0:
                raise ValueError(f"position_ids must not be negative, got {lo}")
            if hi >= limit:
                raise ValueError(f"position_ids reach {hi}, beyond the model's max context "
                                 f"(max_position_embeddings={limit}: positions 0 .. {limit - 1})")

    def _check_labels(self, input_ids: torch.Tensor, labels: torch.Tensor, cache, last_only: bool) -> None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be an int64 tensor of token ids (-100 to ignore), got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if labels.device != input_ids.device:
            raise ValueError(f"labels are on {labels.device}, input_ids on {input_ids.device}")
        if cache is not None or last_only:
            raise ValueError("labels compute the training loss over every position: they cannot be combined "
                             "with a KV cache or last_only")

    @staticmethod
    def _check_router_outputs(output_router_logits, return_aux, sparse: bool) -> None:
        if output_router_logits is not None and not isinstance(output_router_logits, bool):
            raise TypeError(f"output_router_logits must be True, False or None, got {output_router_logits!r}")
        if not isinstance(return_aux, bool):
            raise TypeError(f"return_aux must be True or False, got {return_aux!r}")
        if return_aux and not sparse:
            raise ValueError("return_aux=True: this model has no Mixture-of-Experts layer (config.num_experts is 0 "
                             "or every layer is in config.mlp_only_layers), so there is no routing to report")

    def _warn_fallbacks(self, device: torch.device, dtype: torch.dtype) -> None:
        if (device, dtype) in self._warned_devices:
            return
        self._warned_devices.add((device, dtype))
        fallbacks = {op: c.reason for op, c in ops.report(device, dtype).items() if c.backend != "triton"}
        if fallbacks:
            log.warning("QWEN(fused=True) on %s in %s: these ops fall back to the eager reference: %s",
                        device, dtype, "; ".join(f"{op} ({why})" for op, why in fallbacks.items()))

    def num_parameters(self, unique: bool = True) -> int:
        """Parameter count; ``unique`` counts a tied embedding/LM head once."""
        params = self.parameters() if unique else (p for _, p in self.named_parameters(remove_duplicate=False))
        return sum(p.numel() for p in params)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 stream=None, cuda_graph: bool | None = None, vocab_size: int | None = None) -> torch.Tensor:
        """Prompt plus generated tokens (B, T + steps); greedy at temperature 0. See
        ``qwen3_kernels.generation`` for the details; ``generate_stream`` is the iterator twin."""
        from .generation import generate
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, attention_mask=attention_mask, generator=generator,
                        stream=stream, cuda_graph=cuda_graph, vocab_size=vocab_size)

    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs):
        """Yields each step's next tokens (B,) as they are produced; same arguments as ``generate``."""
        from .generation import generate_stream
        return generate_stream(self, input_ids, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, fused: bool = False) -> "QWEN":
        """Loads a Hugging Face Qwen3 checkpoint directory (config.json + safetensors). ``dtype`` is a
        torch dtype or its name ("bfloat16")."""
        from .loading import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device, fused=fused)
