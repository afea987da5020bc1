"""Run: transformers builds the architecture from ``config.json``; each packed Linear becomes a
:class:`PackedLinear` whose forward quantizes activations per token (int8 absmax, BitNet) or keeps them fp32, and
calls bitsweep.kernels.fast. Everything else (attention, norms, an unpacked lm_head) is torch fp32. A packed tied
head (option ``head``) is also the input embedding: :class:`PackedEmbedding` looks up dequantized rows.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np

from bitsweep.backends.base import BaseRunner
from bitsweep.backends.bitnet.quantize import HEAD, load_packed
from bitsweep.backends.torch_ref import TorchRunner
from bitsweep.errors import ConfigError

# PackedLinear runs the packed GEMV/GEMM kernels for integer activations at every batch size where they beat BLAS
# (fast.packed_batches: the SIMD paths, every format but int3; prompts and scoring windows included), else from
# this many tokens per call through BLAS: integer activations as exact GEMMs of the integer codes
# (fast.gemm_exact: the kernels' bits), fp32 activations on the decoded weights.
DEQUANT_BATCH = 16

# Projections that read the same input (a block's hidden state) in every architecture we pack: during generation
# each set runs as one GEMV over their stacked rows (one compiled call and one activation quantization instead of
# three or two). Each row's arithmetic is unchanged, so the outputs are the same bits.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class StackedRows:
    """Packed matrices of the same format, group and input width stacked row-wise into one (``pm``); each member
    keeps a view of its rows. :meth:`token` computes all rows for one token and hands each member its slice,
    once per input: the first member called computes, the others reuse it for an input with the same bits
    (the last input's bytes are compared, whatever order or tensor objects the caller uses)."""

    def __init__(self, members) -> None:
        from bitsweep.kernels.formats import PackedMatrix

        first = members[0]
        self.pm = PackedMatrix(
            first.fmt, first.group, first.k, _stack([m.qs for m in members]), _stack([m.d for m in members]),
            None if first.m is None else _stack([m.m for m in members]),
        )  # fmt: skip
        bounds = np.cumsum([0, *(m.n_rows for m in members)])
        self.rows = [(int(a), int(b)) for a, b in pairwise(bounds)]
        # _rows_of: the kernels' reordered codes of a view are rows of the stack's, not a copy of their own
        self.views = [
            PackedMatrix(first.fmt, first.group, first.k, self.pm.qs[a:b], self.pm.d[a:b],
                         None if first.m is None else self.pm.m[a:b], {"_rows_of": (self.pm, a, b)})
            for a, b in self.rows
        ]  # fmt: skip
        self._input, self._out = None, None

    @staticmethod
    def stackable(members) -> bool:
        first = members[0]
        return all(
            (m.fmt, m.group, m.k, m.m is None) == (first.fmt, first.group, first.k, first.m is None)
            for m in members
        )

    def token(self, x, member: int):
        """Rows of ``member`` for one token ``x`` (a float32 CPU tensor of ``k`` values), as a NumPy array."""
        from bitsweep.kernels import fast

        values = x.numpy().reshape(-1)
        key = values.tobytes()  # the input's bits: same bits in, same rows out (a few KB: ~0.2 us to compare)
        if key != self._input:
            self._out = fast.linear_token(self.pm, values)
            self._input = key
        a, b = self.rows[member]
        return self._out[a:b]


def _stack(arrays):
    """``np.concatenate(arrays)`` in the kernels' huge-page arena (bitsweep.kernels.memory)."""
    from bitsweep.kernels import memory

    out = memory.arena().empty((sum(a.shape[0] for a in arrays), *arrays[0].shape[1:]), arrays[0].dtype)
    return np.concatenate(arrays, out=out)


def packed_linear_class():
    import torch

    from bitsweep.kernels import fast

    class PackedLinear(torch.nn.Module):
        """``y = x @ W.T (+ b)`` with ``W`` packed; x ``(..., k)`` fp32 -> y ``(..., n_rows)`` fp32."""

        def __init__(self, pm, bias, act: str) -> None:
            super().__init__()
            self.pm, self.act = pm, act
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
            self.stacked: tuple[StackedRows, int] | None = None  # set by stack_siblings

        def forward(self, x):
            shape, pm = x.shape, self.pm
            if self.act == "int8" and x.numel() == shape[-1] and x.dtype == torch.float32:
                # Generation: one token, one compiled call (Python-side overhead dominates otherwise).
                if self.stacked is not None:
                    rows = self.stacked[0].token(x, self.stacked[1])
                else:
                    rows = fast.linear_token(pm, x.numpy().reshape(-1))
                y = torch.from_numpy(rows).view(*shape[:-1], pm.n_rows)
                return y if self.bias is None else y + self.bias
            flat = x.reshape(-1, shape[-1]).float().contiguous().numpy()
            acts = fast.prepare_activations_fast(flat, pm.k_padded, pm.group, self.act)
            if flat.shape[0] < DEQUANT_BATCH or (acts.integer and fast.packed_batches(pm)):
                y = torch.from_numpy(fast.gemm_prepared(pm, acts))
            elif acts.integer:
                # Prompt-sized batches (scoring a window) where BLAS is faster: the integer group sums as exact
                # GEMMs, so the scored logits are the int8 kernels' bits on every CPU and thread count.
                y = torch.from_numpy(fast.gemm_exact(pm, acts))
            else:
                # fp32 activations: decode the weights once (our kernel) and let sgemm do the products.
                n = flat.shape[0]
                x_used = (acts.x.reshape(n, -1, pm.group) * acts.scale[:, :, None]).reshape(n, -1)[:, : pm.k]
                y = torch.from_numpy(x_used) @ torch.from_numpy(fast.dequantize(pm)).T
            y = y.reshape(*shape[:-1], pm.n_rows)
            return y if self.bias is None else y + self.bias

        def extra_repr(self) -> str:
            return f"{self.pm.fmt.name}, group={self.pm.group}, k={self.pm.k}, n={self.pm.n_rows}, act={self.act}"

    return PackedLinear


def stack_siblings(model, packed_linear) -> None:
    """Give each set of :data:`SIBLINGS` of a block (all PackedLinear, int8 activations, stackable) one
    :class:`StackedRows`; the members' matrices become views of its rows (no second copy)."""
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, packed_linear) and m.act == "int8" for m in members):
                continue
            if not StackedRows.stackable([m.pm for m in members]):
                continue
            rows = StackedRows([m.pm for m in members])
            for index, (member, view) in enumerate(zip(members, rows.views, strict=True)):
                member.pm, member.stacked = view, (rows, index)


def to_huge_pages(model, packed_linear) -> None:
    """Move the packed matrices that are not rows of a stack (stacks are made there) into huge pages
    (fast.to_huge_pages), once each: a tied packed head is also the embedding's matrix."""
    from bitsweep.kernels import fast

    moved = set()
    for module in model.modules():
        if isinstance(module, packed_linear) and module.stacked is None and id(module.pm) not in moved:
            fast.to_huge_pages(module.pm)
            moved.add(id(module.pm))


def packed_embedding(pm, like):
    """An embedding module whose table is the packed matrix ``pm`` (rows dequantized on lookup), standing in for
    ``like`` (nn.Embedding, or Gemma 3's scaled one: its ``embed_scale`` is applied as there)."""
    import torch

    from bitsweep.kernels.formats import PackedMatrix, dequantize

    class PackedEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pm = pm
            self.embed_scale = getattr(like, "embed_scale", None)

        def forward(self, ids):
            flat = ids.reshape(-1).numpy()
            rows = PackedMatrix(
                pm.fmt, pm.group, pm.k, pm.qs[flat], pm.d[flat], None if pm.m is None else pm.m[flat]
            )
            out = torch.from_numpy(dequantize(rows)).reshape(*ids.shape, pm.k)
            return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)

    return PackedEmbedding()


def build_model(path: Path, act: str | None = None):
    """The transformers model of a bitnet artifact, its packed Linear layers replaced by PackedLinear.

    The model is built with its parameters on the meta device (the artifact supplies them) and its buffers on
    the CPU, computed by the architecture's own code: RoPE frequencies (Gemma 3: two rotary modules, one with
    the local base) and Gemma's ``embed_scale`` are not in the weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.accelerate import init_empty_weights

    packed, kept, info = load_packed(path)
    config = AutoConfig.from_pretrained(path)
    tied_head = bool(info.get("tied_head"))
    if tied_head:  # two modules share the packed matrix instead of one float parameter
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    PackedLinear = packed_linear_class()
    for module, pm in packed.items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name)
        bias = kept.pop(f"{module}.bias", None)
        linear = PackedLinear(pm, None if bias is None else torch.from_numpy(bias), act or info["act"])
        setattr(parent, child, linear)
    stack_siblings(model, PackedLinear)
    to_huge_pages(model, PackedLinear)
    if tied_head:
        model.set_input_embeddings(packed_embedding(packed[HEAD], model.get_input_embeddings()))
    state = {name: torch.from_numpy(array.astype(np.float32)) for name, array in kept.items()}
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ConfigError(f"{path}: tensors the architecture does not have: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise ConfigError(f"{path}: weights missing from the artifact: {missing[:5]}")
    return model.eval(), info


class Runner(TorchRunner):
    """TorchRunner's scoring and timed generation, on the packed model."""

    def __init__(
        self,
        path: str | Path,
        threads: int,
        n_ctx: int = 512,
        act: str | None = None,
        fused_decode: bool = True,
    ) -> None:
        import numba
        import torch

        from bitsweep.backends.bitnet.decode import Decoder, unsupported

        BaseRunner.__init__(self, path, threads, n_ctx)
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.torch = torch
        self.model, self.info = build_model(Path(path), act)
        self._refuse_longer_than_trained()
        self.past = None
        # Generation after the prompt runs on NumPy and the packed kernels where the block is Llama's
        # (bitnet.decode); the prompt and every scored window stay on transformers' forward.
        why_not = "fused_decode=False" if not fused_decode else unsupported(self.model, n_ctx)
        self.decoder = None if why_not else Decoder(self.model)
        self.decode_path = f"transformers ({why_not})" if why_not else "fused"

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        last = super()._prefill(prompt)
        if self.decoder is not None:
            self.decoder.load_cache(self.past, len(prompt))
            self.past = None  # the decoder's cache is the one that grows from here
        return last

    def _step(self, token: int) -> np.ndarray:
        if self.decoder is None:
            return super()._step(token)
        return self.decoder.step(token)

    def greedy(self, prompt: np.ndarray, n_new: int) -> np.ndarray:
        """The untimed continuations (a quality column) come from transformers' forward, as the scored logits do:
        its float parts are pinned to one code path on every host (INFO.evaluate_env), the decoder's are not.
        (``greedy_many``, TorchRunner's batch, runs transformers' forward too.)"""
        decoder, self.decoder = self.decoder, None
        try:
            return super().greedy(prompt, n_new)
        finally:
            self.decoder = decoder

    def speed_info(self) -> dict[str, str]:
        return {"decode_path": self.decode_path}

    def scoring_info(self) -> dict[str, str | float]:
        """The code paths the float parts ran on (bitnet's INFO.evaluate_env pins them in the workflow)."""
        import os

        from bitsweep.kernels import fast

        return {"torch_cpu_capability": self.torch.backends.cpu.get_cpu_capability(),
                "mkl_cbwr": os.environ.get("MKL_CBWR", ""), "kernel_isa": fast.current_isa()}  # fmt: skip

    def close(self) -> None:
        super().close()
        self.decoder = None


BitnetRunner = Runner
