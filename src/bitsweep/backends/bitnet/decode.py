"""One generated token without torch: the bitnet runner's decode step for Llama-style blocks.

A generated token through transformers costs more outside the packed projections than in them (a 16-layer 1024-wide
ternary Llama, one thread: 8.3 ms of compiled GEMVs, 7.2 ms of torch's attention, norms, rotary embedding, masks,
cache bookkeeping and the modules' Python). :class:`Decoder` runs the same block on NumPy arrays: the projections
through the packed kernels as before (``fast.linear_token``, the stacked q/k/v and gate/up rows as one GEMV each),
RMSNorm, rotary embedding, attention over a NumPy KV cache and the MLP's gating as small numba kernels, a handful of
compiled calls per block. The prompt still runs through transformers (its prefill is a GEMM over the prompt); its
KV cache is copied into the decoder's, so every generated token after the first runs here.

The float parts follow transformers' formulas in float32 but not its operation order, so logits differ from the
torch path's in the last bits, and an int8 activation code can round the other way (tests bound the difference and
check the greedy tokens). A float LM head that float16 holds exactly is read as float16 (:func:`float16_head`).
Only timed generation uses this path: scored logits (perplexity, KLD) and the untimed greedy continuations come
from the torch forward and are unchanged.

Architectures: those whose block is Llama's (``llama``, ``mistral``, ``qwen2`` with its q/k/v biases, ``qwen3``
with its per-head q/k norms, ``bitnet``: BitNet b1.58's sub-norms and squared-ReLU gate): pre-norm RMSNorm, rotary
embedding over the whole head (cos/sin from the model's own rotary module, so scaled RoPE variants are the
model's), grouped-query attention, gated MLP. Others (Gemma 3, Phi-3) decode through transformers as before:
:func:`unsupported` says why.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from bitsweep.kernels import fast, memory

FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "bitnet")
# the MLP's gate activation: SiLU (Llama and the others), squared ReLU (BitNet b1.58)
ACTIVATIONS = {"silu": 0, "relu2": 1}


def unsupported(model, n_ctx: int) -> str | None:
    """Why ``model`` cannot decode here (None if it can)."""
    config = model.config
    if config.model_type not in FUSED_MODEL_TYPES:
        return f"model_type {config.model_type!r} (fused decoding covers {', '.join(FUSED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") not in ACTIVATIONS:
        return f"hidden_act {config.hidden_act!r} (fused decoding covers {', '.join(ACTIVATIONS)})"
    window = getattr(config, "sliding_window", None)
    sliding = any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ())
    if (sliding or config.model_type == "mistral") and window and n_ctx > window:
        return f"sliding-window attention ({window} tokens) within n_ctx={n_ctx}"
    partial = getattr(config, "partial_rotary_factor", 1.0)
    if partial != 1.0:
        return f"partial rotary embedding ({partial})"
    return None


# --- compiled pieces (float32 as transformers computes them; comments give the torch formula) -------------------


@njit(cache=True)
def rms_norm(x, w, eps, out):
    """``w * (x * rsqrt(mean(x**2) + eps))`` (LlamaRMSNorm; the mean accumulated in float64). ``out`` may be
    ``x``."""
    total = 0.0
    for i in range(x.size):
        total += np.float64(x[i]) * np.float64(x[i])
    inv = np.float32(1.0 / np.sqrt(np.float32(total / x.size) + eps))
    for i in range(x.size):
        out[i] = w[i] * (x[i] * inv)


@njit(cache=True)
def add_rms_norm(h, delta, w, eps, out):
    """The residual stream ``h += delta`` (in place), then ``out = RMSNorm(h)``: a block's two halves meet here."""
    for i in range(h.size):
        h[i] += delta[i]
    rms_norm(h, w, eps, out)


@njit(cache=True)
def _rope(x, cos, sin, half):
    """``x * cos + rotate_half(x) * sin`` on one head (rotate_half: ``[-x2, x1]`` of its halves), in place."""
    for i in range(half):
        a, b = x[i], x[i + half]
        x[i] = a * cos[i] - b * sin[i]
        x[i + half] = b * cos[i + half] + a * sin[i + half]


@njit(cache=True)
def attend(qkv, n_heads, n_kv, head_dim, cos, sin, q_norm, k_norm, eps, keys, values, pos, scaling, out):
    """One token's attention in one block.

    ``qkv``: the stacked projections ``[q (n_heads, head_dim) | k (n_kv, head_dim) | v (n_kv, head_dim)]``, head
    major as transformers views them; ``q_norm``/``k_norm``: per-head RMSNorm weights (Qwen3) or empty; ``cos``,
    ``sin``: ``(head_dim,)`` at ``pos``; ``keys``: this block's key cache transposed, ``(n_kv, head_dim,
    capacity)``, and ``values`` ``(n_kv, capacity, head_dim)``, positions ``< pos`` filled, this token's written
    at ``pos``. ``out``: ``(n_heads * head_dim,)``, softmax over positions ``0..pos`` (causal, no mask otherwise).

    Each score is the sum over ``i`` in order of ``q[i] * k[t, i]`` as before, but computed for all positions at
    once, dimension by dimension: along a row of the transposed keys the positions are independent, so the loop
    vectorises with the same float operations per score (one position at a time, the strict float order kept
    the sum scalar: 30 blocks of SmolLM2 spent 3.4 ms of a 10 ms token here at 200 positions)."""
    q_end = n_heads * head_dim
    k_end = q_end + n_kv * head_dim
    half = head_dim // 2
    q = qkv[:q_end].copy()
    normed = np.empty(head_dim, np.float32)
    k = np.empty(head_dim, np.float32)
    for h in range(n_heads):
        head = q[h * head_dim : (h + 1) * head_dim]
        if q_norm.size:
            rms_norm(head, q_norm, eps, normed)
            head[:] = normed
        _rope(head, cos, sin, half)
    for g in range(n_kv):
        if k_norm.size:
            rms_norm(qkv[q_end + g * head_dim : q_end + (g + 1) * head_dim], k_norm, eps, k)
        else:
            k[:] = qkv[q_end + g * head_dim : q_end + (g + 1) * head_dim]
        _rope(k, cos, sin, half)
        keys[g, :, pos] = k
        values[g, pos] = qkv[k_end + g * head_dim : k_end + (g + 1) * head_dim]
    group = n_heads // n_kv
    n = pos + 1
    scores = np.empty(n, np.float32)
    for h in range(n_heads):
        g = h // group
        head = q[h * head_dim : (h + 1) * head_dim]
        scores[:] = 0
        for i in range(head_dim):
            qi, row = head[i], keys[g, i]
            for t in range(n):
                scores[t] += qi * row[t]
        top = np.float32(-np.inf)
        for t in range(n):
            scores[t] = scores[t] * scaling
            top = max(top, scores[t])
        total = np.float32(0.0)
        for t in range(n):
            scores[t] = np.exp(scores[t] - top)
            total += scores[t]
        o = out[h * head_dim : (h + 1) * head_dim]
        o[:] = 0
        for t in range(n):
            p, row = scores[t] / total, values[g, t]  # a row view: the loop over i then vectorises
            for i in range(head_dim):
                o[i] += p * row[i]


@njit(cache=True)
def gate(gate_up, n, activation, out):
    """``act(gate) * up`` with ``gate_up = [gate (n) | up (n)]``; ``activation`` (:data:`ACTIVATIONS`) 0: SiLU,
    ``x * sigmoid(x)``; 1: squared ReLU, ``relu(x)**2``."""
    for i in range(n):
        g = gate_up[i]
        if activation == 0:
            a = g / (np.float32(1.0) + np.exp(-g))
        else:
            a = max(g, np.float32(0.0))
            a = a * a
        out[i] = a * gate_up[n + i]


# --- the decoder -------------------------------------------------------------------------------------------------


class Projection:
    """One or more Linear modules that read the same input, as one call ``x -> [rows of each]`` on NumPy arrays:
    stacked packed rows (bitnet.runner.StackedRows) in one GEMV, a packed Linear with per-token int8 activations
    through ``fast.linear_token``, anything else (fp32 activations, an unpacked Linear) through its own forward."""

    def __init__(self, modules) -> None:
        import torch

        self.torch, self.modules = torch, modules
        stack = getattr(modules[0], "stacked", None)
        in_order = stack is not None and all(
            getattr(m, "stacked", None) == (stack[0], i) for i, m in enumerate(modules)
        )
        self.stacked = stack[0].pm if in_order and len(stack[0].rows) == len(modules) else None
        self.bias = None
        if self.stacked is not None and any(m.bias is not None for m in modules):
            self.bias = np.concatenate([
                np.zeros(m.pm.n_rows, np.float32) if m.bias is None else m.bias.detach().float().numpy()
                for m in modules
            ])  # fmt: skip

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.stacked is None:  # each module adds its own bias
            outs = [self._one(m, x) for m in self.modules]
            return outs[0] if len(outs) == 1 else np.concatenate(outs)
        y = fast.linear_token(self.stacked, x)
        return y if self.bias is None else y + self.bias

    def _one(self, module, x: np.ndarray) -> np.ndarray:
        if getattr(module, "act", None) == "int8" and hasattr(module, "pm"):
            y = fast.linear_token(module.pm, x)
            return y if module.bias is None else y + module.bias.detach().numpy()
        with self.torch.inference_mode():
            return module(self.torch.from_numpy(x)[None]).float().numpy()[0]


def float16_head(head) -> np.ndarray | None:
    """The bits of a float LM head as float16 ``(vocab, hidden)`` uint16, if float16 holds every weight exactly
    (the artifact keeps unpacked 2-D tensors in float16 by default: ``keep_dtype``; transformers holds them as
    float32), else None. Generation then reads half the bytes per token, as llama.cpp's f16 head does; the
    weights, and so the model, are the same."""
    import torch

    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight.detach().numpy()
    half = weight.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), weight):
        return None
    return memory.copy(half.view(np.uint16))  # streamed once per token: on huge pages


class Block:
    """One decoder block's weights and projections, as :meth:`Decoder.step` reads them."""

    def __init__(self, layer, config) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln_in = layer.input_layernorm.weight.detach().float().numpy()
        self.ln_post = layer.post_attention_layernorm.weight.detach().float().numpy()
        self.eps = np.float32(layer.input_layernorm.variance_epsilon)
        self.qkv = Projection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = Projection([attn.o_proj])
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj])
        self.down = Projection([mlp.down_proj])
        self.scaling = np.float32(attn.scaling)
        self.activation = ACTIVATIONS[getattr(config, "hidden_act", "silu")]
        # optional norms, empty where the architecture has none: Qwen3's per-head q/k norms, BitNet's sub-norms
        # of the attention output (before o_proj) and of the gated MLP activation (before down_proj)
        self.q_norm, self.qk_eps = _norm(attn, "q_norm")
        self.k_norm, _ = _norm(attn, "k_norm")
        self.attn_sub_norm, self.attn_sub_eps = _norm(attn, "attn_sub_norm")
        self.ffn_sub_norm, self.ffn_sub_eps = _norm(mlp, "ffn_sub_norm")


def _norm(parent, name: str) -> tuple[np.ndarray, np.float32]:
    """An RMSNorm child's weight and epsilon, or an empty weight if ``parent`` has none of that name."""
    norm = getattr(parent, name, None)
    if norm is None:
        return np.empty(0, np.float32), np.float32(0)
    return norm.weight.detach().float().numpy(), np.float32(norm.variance_epsilon)


class Decoder:
    """Greedy decoding state of one packed model: its blocks, a float32 KV cache that grows by doubling, and the
    rotary table (``cos``/``sin`` per position, from the model's rotary module)."""

    def __init__(self, model) -> None:
        import torch

        self.torch, self.model = torch, model
        config = model.config
        body = model.model
        self.blocks = [Block(layer, config) for layer in body.layers]
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.n_inter = config.intermediate_size
        self.norm = body.norm.weight.detach().float().numpy()
        self.norm_eps = np.float32(body.norm.variance_epsilon)
        self.embed = body.embed_tokens
        self.table = self.embed.weight.detach().float().numpy() if isinstance(
            self.embed, torch.nn.Embedding
        ) else None  # fmt: skip
        self.head = Projection([model.lm_head])
        self.head16 = float16_head(model.lm_head)
        self.capacity, self.pos = 0, 0
        self.keys = self.values = self.cos = self.sin = None
        hidden = config.hidden_size
        self._x = np.empty(hidden, np.float32)
        self._att = np.empty(self.n_heads * self.head_dim, np.float32)
        self._act = np.empty(self.n_inter, np.float32)

    def _reserve(self, n: int) -> None:
        """Room for ``n`` positions: the cache and rotary table grow to the next power of two."""
        if n <= self.capacity:
            return
        capacity = max(256, 1 << (n - 1).bit_length())
        # keys transposed, (layer, kv head, head_dim, position): see attend
        keys = np.zeros((len(self.blocks), self.n_kv, self.head_dim, capacity), np.float32)
        values = np.zeros((len(self.blocks), self.n_kv, capacity, self.head_dim), np.float32)
        if self.keys is not None:
            keys[..., : self.capacity] = self.keys
            values[:, :, : self.capacity] = self.values
        self.keys, self.values, self.capacity = keys, values, capacity
        torch = self.torch
        with torch.inference_mode():
            positions = torch.arange(capacity)[None]
            cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        self.cos, self.sin = cos[0].float().numpy().copy(), sin[0].float().numpy().copy()

    def load_cache(self, past, n_tokens: int) -> None:
        """Take over transformers' KV cache after a prefill of ``n_tokens`` (the next token is at ``n_tokens``)."""
        self._reserve(n_tokens + 1)
        for index, layer in enumerate(past.layers):
            self.keys[index, ..., :n_tokens] = layer.keys[0].float().numpy().transpose(0, 2, 1)
            self.values[index, :, :n_tokens] = layer.values[0].float().numpy()
        self.pos = n_tokens

    def _embedding(self, token: int) -> np.ndarray:
        if self.table is not None:
            return self.table[token].copy()
        with self.torch.inference_mode():  # a packed tied embedding dequantizes its row
            return self.embed(self.torch.tensor([[token]]))[0, 0].float().numpy().copy()

    def step(self, token: int) -> np.ndarray:
        """The next token's logits after ``token`` at the current position; the position advances."""
        self._reserve(self.pos + 1)
        pos, x, att, act = self.pos, self._x, self._att, self._act
        h = self._embedding(token)
        delta = None
        cos, sin = self.cos[pos], self.sin[pos]
        for index, block in enumerate(self.blocks):
            if delta is None:
                rms_norm(h, block.ln_in, block.eps, x)
            else:
                add_rms_norm(h, delta, block.ln_in, block.eps, x)
            attend(block.qkv(x), self.n_heads, self.n_kv, self.head_dim, cos, sin, block.q_norm, block.k_norm,
                   block.qk_eps, self.keys[index], self.values[index], pos, block.scaling, att)  # fmt: skip
            if block.attn_sub_norm.size:
                rms_norm(att, block.attn_sub_norm, block.attn_sub_eps, att)
            add_rms_norm(h, block.o(att), block.ln_post, block.eps, x)
            gate(block.gate_up(x), self.n_inter, block.activation, act)
            if block.ffn_sub_norm.size:
                rms_norm(act, block.ffn_sub_norm, block.ffn_sub_eps, act)
            delta = block.down(act)
        add_rms_norm(h, delta, self.norm, self.norm_eps, x)
        self.pos = pos + 1
        if self.head16 is None:
            return self.head(x)
        logits = np.empty(self.head16.shape[0], np.float32)
        fast.gemv_f16(self.head16, x, logits)
        return logits
