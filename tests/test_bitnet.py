"""Backend bitnet on small Llama models: packed storage, the PackedLinear wiring, GGUF export read by llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitsweep.backends.bitnet.export import compare_logits, cross_check_llamacpp, export_gguf
from bitsweep.backends.bitnet.quantize import load_packed
from bitsweep.backends.bitnet.runner import Runner as BitnetRunner
from bitsweep.config import SchemeConfig
from bitsweep.errors import ConfigError
from bitsweep.kernels.formats import dequantize

from . import helpers

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")


def quantize(model_dir, out, name, bits, **options):
    return helpers.quantize("bitnet", model_dir, name, bits, out / name, **options)


@pytest.fixture(scope="module")
def tiny256_dir(tmp_path_factory, smol_tokenizer):
    """One Llama block 256 wide (rows fit TQ blocks), GQA (4 heads, 2 KV heads) so Q and K rows get permuted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, rope_theta=10000.0, initializer_range=0.05,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("tiny256")
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    smol_tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("name", "bits", "options", "bytes_per_row"),
    [
        ("tq2_0", 2, {"format": "tq2_0"}, lambda k: -(-k // 256) * 64),
        ("tq1_0", 1, {"format": "tq1_0"}, lambda k: -(-k // 256) * 52),
        ("int4_g64", 4, {"format": "int4", "group_size": 64}, lambda k: k // 2),
        ("binary", 1, {"format": "binary"}, lambda k: -(-k // 256) * 32),
    ],
)
def test_artifact_stores_codes_at_the_claimed_width(
    tiny_model_dir, tmp_path, name, bits, options, bytes_per_row
):
    artifact = quantize(tiny_model_dir, tmp_path, name, bits, **options)
    packed, kept, info = load_packed(artifact.path)
    assert len(packed) == 2 * 7 and info["format"] == options["format"]
    for module, pm in packed.items():
        assert pm.qs.dtype == np.uint8 and pm.qs.shape == (pm.n_rows, bytes_per_row(pm.k)), module
        assert pm.d.dtype == np.float16
    assert kept["model.embed_tokens.weight"].dtype == np.float16  # keep_dtype default
    assert kept["model.norm.weight"].dtype == np.float32
    applied = artifact.meta["applied"]
    assert applied["n_packed_tensors"] == 14 and applied["packed_bpw"] >= applied["nominal_bpw"]
    assert artifact.model_file.stat().st_size < (tiny_model_dir / "model.safetensors").stat().st_size


def test_runner_computes_the_dequantized_model(tiny_model_dir, tmp_path):
    """With fp32 activations the packed model is exactly torch's model with dequantized weights (both paths:
    packed kernels for short inputs, decode + sgemm for prompt-sized ones)."""
    from transformers import AutoModelForCausalLM

    artifact = quantize(tiny_model_dir, tmp_path, "int3", 3, format="int3", group_size=256, act="fp32")
    packed, kept, _ = load_packed(artifact.path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    state = model.state_dict()
    for module, pm in packed.items():
        state[f"{module}.weight"] = torch.from_numpy(dequantize(pm).copy())
    state["model.embed_tokens.weight"] = torch.from_numpy(
        kept["model.embed_tokens.weight"].astype(np.float32)
    )
    model.load_state_dict(state)
    runner = BitnetRunner(artifact.path, threads=2, n_ctx=128)
    ids = np.random.default_rng(0).integers(0, 1000, 100)
    for n in (8, 100):  # below and above DEQUANT_BATCH
        with torch.inference_mode():
            want = model(torch.as_tensor(ids[None, :n])).logits[0].numpy()
        np.testing.assert_allclose(runner.logits(ids[:n]), want, atol=2e-4, rtol=1e-4)
    prompt_s, gen_s = runner.generate(ids[:16], 4)
    assert prompt_s > 0 and gen_s > 0


def test_a_packed_tied_head_is_the_embedding_and_the_head(tiny_model_dir, tmp_path):
    """Option head: the tied embedding/head is stored once, packed (no float copy left), and the model computes
    exactly torch's model with that dequantized matrix as both its embedding and its head (fp32 activations)."""
    from transformers import AutoModelForCausalLM

    artifact = quantize(tiny_model_dir, tmp_path, "h", 4, format="int4", group_size=64, act="fp32", head="int4",
                        head_group_size=64)  # fmt: skip
    packed, kept, info = load_packed(artifact.path)
    assert info["tied_head"] and "model.embed_tokens.weight" not in kept
    head = packed["lm_head"]
    assert (head.fmt.name, head.group, head.n_rows) == ("int4", 64, 49152)
    applied = artifact.meta["applied"]
    assert (
        applied["n_packed_tensors"] == 15 and applied["head"] == "int4" and applied["head_group_size"] == 64
    )
    # the block weights' own figure, head excluded
    assert applied["packed_bpw"] == pytest.approx(4.5, abs=0.01)
    float_head = quantize(tiny_model_dir, tmp_path, "f", 4, format="int4", group_size=64, act="fp32")
    assert artifact.model_file.stat().st_size < 0.6 * float_head.model_file.stat().st_size

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    state = model.state_dict()
    for module, pm in packed.items():
        state[f"{module}.weight"] = torch.from_numpy(dequantize(pm).copy())
    state["model.embed_tokens.weight"] = state["lm_head.weight"]
    model.load_state_dict(state)
    runner = BitnetRunner(artifact.path, threads=2, n_ctx=128)
    assert type(runner.model.get_input_embeddings()).__name__ == "PackedEmbedding"
    ids = np.random.default_rng(2).integers(0, 49152, 40)
    for n in (1, 8, 40):  # one token (generation), the packed kernels, decode + sgemm
        with torch.inference_mode():
            want = model(torch.as_tensor(ids[None, :n])).logits[0].numpy()
        np.testing.assert_allclose(runner.logits(ids[:n]), want, atol=2e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="head: float"):
        export_gguf(artifact.path, tmp_path / "f32.gguf", tmp_path / "none.gguf")  # checked before reading it


def test_int8_activations_cost_little_on_a_4_bit_model(tiny_model_dir, tmp_path):
    fp32 = BitnetRunner(quantize(tiny_model_dir, tmp_path, "a", 4, format="int4", act="fp32").path, 2)
    int8 = BitnetRunner(quantize(tiny_model_dir, tmp_path, "b", 4, format="int4", act="int8").path, 2)
    ids = np.random.default_rng(1).integers(0, 1000, 40)
    stats = compare_logits(fp32.logits(ids), int8.logits(ids))
    assert 0 < stats["kld_mean"] < 1e-3 and stats["top1_agreement"] > 0.9


def test_bad_options_fail_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown bitnet format 'INT5'; known: BINARY, INT2"):
        SchemeConfig("bitnet", "x", 4, {"format": "int5"})
    with pytest.raises(ConfigError, match="no 2-D weights match layers"):
        quantize(tiny_model_dir, tmp_path, "none", 4, format="int4", layers=["nothing_proj"])
    with pytest.raises(ConfigError, match="known: fp32, int8, int8_block"):
        quantize(tiny_model_dir, tmp_path, "act", 4, format="int4", act="int4")
    with pytest.raises(ConfigError, match="multiple of 64"):
        quantize(tiny_model_dir, tmp_path, "grp", 4, format="int4", group_size=48)
    with pytest.raises(
        ConfigError, match=r"unknown bitnet head format \(option head\) 'int5'; known: binary, float, int2"
    ):
        SchemeConfig("bitnet", "x", 4, {"format": "int4", "head": "int5"})
    with pytest.raises(ConfigError, match="head_group_size needs a packed head"):
        SchemeConfig("bitnet", "x", 4, {"format": "int4", "head_group_size": 64})


def test_layer_patterns_select_modules(tiny_model_dir, tmp_path):
    artifact = quantize(
        tiny_model_dir, tmp_path, "pat", 2, format="tq2_0", layers=["model.layers.1.mlp.*", "q_proj"]
    )
    packed, _, _ = load_packed(artifact.path)
    assert sorted(packed) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj",
    ]  # fmt: skip


@pytest.mark.llamacpp
def test_gguf_export_is_read_by_llamacpp_as_our_weights(tiny256_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from bitsweep.backends.llamacpp.convert import convert_hf_to_gguf
    from bitsweep.backends.llamacpp.quantize import gguf_summary

    f32 = tmp_path / "model-f32.gguf"
    convert_hf_to_gguf(tiny256_dir, f32, "f32")
    artifact = quantize(tiny256_dir, tmp_path, "tq2_0", 2, format="tq2_0", keep_dtype="float32")
    ids = np.random.default_rng(2).integers(0, 5000, 96)
    result = cross_check_llamacpp(artifact.path, f32, [ids], tmp_path / "ours.gguf")
    # All seven projections are TQ2_0 (the export re-quantizes llama.cpp's own copy of each source tensor and
    # checks it gives our codes: that proves the name mapping and the Q/K row permutation).
    assert result["export"]["tq_tensors"] == 7 and result["export"]["f32_tensors"] == 0
    assert gguf_summary(tmp_path / "ours.gguf")["tensor_types"]["TQ2_0"] == 7
    close = result["ours_int8_block_vs_llamacpp"]  # llama.cpp's own activation rule (Q8_K)
    assert close["kld_mean"] < 1e-3 and close["top1_agreement"] > 0.95, json.dumps(result)


def test_int8_scoring_gives_the_same_bits_on_every_kernel_path(tiny_model_dir, tmp_path):
    """Windows (through fast.gemm_exact) and short inputs (the packed kernels) on every instruction-set path
    this CPU has and the portable fallback: identical logits. The workflow runs bitnet's evaluations with the
    float parts pinned to AVX2 code paths (INFO.evaluate_env), which the result records."""
    from bitsweep.backends import backend_info
    from bitsweep.kernels import fast

    artifact = quantize(tiny_model_dir, tmp_path, "int4", 4, format="int4", group_size=64, act="int8")
    runner = BitnetRunner(artifact.path, threads=2, n_ctx=128)
    ids = np.random.default_rng(3).integers(0, 1000, 100)
    previous = fast.current_isa()
    try:
        logits = {}
        for isa in fast.available_isas():
            fast.set_isa(isa)
            logits[isa] = (runner.logits(ids), runner.logits(ids[:8]))
    finally:
        fast.set_isa(previous)
    first = logits[fast.available_isas()[0]]
    for isa, (window, short) in logits.items():
        assert np.array_equal(window, first[0]) and np.array_equal(short, first[1]), isa
    assert runner.scoring_info()["kernel_isa"] == previous
    prefix = backend_info("bitnet").evaluate_env_prefix()
    assert prefix == "env ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2"
    assert backend_info("llamacpp").evaluate_env_prefix() == ""


def test_generation_runs_each_blocks_sibling_projections_as_one_gemv(tiny_model_dir, tmp_path, monkeypatch):
    """q/k/v and gate/up share one stacked matrix (the members' matrices are views of its rows): one token costs
    two compiled GEMV calls fewer per block, and the logits are the same bits as with separate GEMVs."""
    from bitsweep.kernels import fast, memory

    artifact = quantize(tiny_model_dir, tmp_path, "tq2", 2, format="tq2_0", act="int8")
    runner = BitnetRunner(artifact.path, threads=2, n_ctx=128)
    linears = [m for m in runner.model.modules() if getattr(m, "stacked", None) is not None]
    n_blocks = runner.model.config.num_hidden_layers
    assert len(linears) == 5 * n_blocks
    attn = runner.model.model.layers[0].self_attn
    stacked = attn.q_proj.stacked[0]
    assert attn.v_proj.stacked == (stacked, 2) and np.shares_memory(attn.k_proj.pm.qs, stacked.pm.qs)
    # every packed matrix the kernels stream lies on huge pages (bitsweep.kernels.memory)
    if memory.arena().huge:
        packed = [m.pm for m in runner.model.modules() if hasattr(m, "pm") and not hasattr(m, "embed_scale")]
        assert packed and all(memory.from_arena(pm.qs) and memory.from_arena(pm.d) for pm in packed)

    calls = []
    original = fast.linear_token
    monkeypatch.setattr(fast, "linear_token", lambda pm, x: calls.append(pm.n_rows) or original(pm, x))
    tokens = np.random.default_rng(4).integers(0, 1000, 3)
    together = [runner.logits(tokens[i : i + 1]) for i in range(3)]
    assert len(calls) == 3 * 4 * n_blocks  # per block: q|k|v, o, gate|up, down
    for module in linears:
        module.stacked = None
    apart = [runner.logits(tokens[i : i + 1]) for i in range(3)]
    assert len(calls) == 3 * 4 * n_blocks + 3 * 7 * n_blocks
    for a, b in zip(together, apart, strict=True):
        np.testing.assert_array_equal(a, b)


def _qwen2_with_biases(out, tokenizer):
    """A tiny Qwen2 (q/k/v biases), its biases random: transformers initialises them to zero."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {}),  # the float head (kept in float16) read as float16
        ("llama", {"keep_dtype": "float32"}),  # a float32 head float16 cannot hold: transformers' product
        ("llama", {"head": "int4", "head_group_size": 64}),  # packed: packed embedding, head GEMV
        ("qwen3", {}),  # per-head q/k norms, heads * head_dim != hidden
        ("qwen2", {}),  # q/k/v biases
        ("bitnet", {}),  # BitNet b1.58: sub-norms before o_proj and down_proj, squared-ReLU gate
    ],
)
def test_fused_decoding_follows_the_transformers_path(
    tiny_model_dir, smol_tokenizer, tmp_path, arch, options
):
    """Generation after the prompt runs on NumPy and the packed kernels (bitnet.decode): the same logits as the
    transformers path to float rounding, step after step past the cache's first growth (256 positions); the
    untimed greedy continuations (a quality column) are still transformers' own, the same tokens bit for bit."""
    from bitsweep.archs import make_tiny_model

    model_dir = {
        "llama": lambda: tiny_model_dir,
        "qwen3": lambda: make_tiny_model("qwen3", tmp_path / "qwen3"),
        "bitnet": lambda: make_tiny_model("bitnet", tmp_path / "bitnet"),
        "qwen2": lambda: _qwen2_with_biases(tmp_path / "qwen2", smol_tokenizer),
    }[arch]()
    artifact = quantize(model_dir, tmp_path, "tq2", 2, format="tq2_0", act="int8", **options)
    fused = BitnetRunner(artifact.path, threads=2, n_ctx=512)
    plain = BitnetRunner(artifact.path, threads=2, n_ctx=512, fused_decode=False)
    assert (fused.decode_path, plain.decode_path) == ("fused", "transformers (fused_decode=False)")
    assert fused.speed_info() == {"decode_path": "fused"}
    assert (fused.decoder.head16 is not None) == (not options), (
        "a float16-exact float head is read as float16"
    )
    ids = np.random.default_rng(5).integers(0, 1000, 262)
    steps = {}
    for name, runner in (("fused", fused), ("plain", plain)):
        steps[name] = np.array([runner._prefill(ids[:250])] + [runner._step(int(t)) for t in ids[250:]])
    assert fused.decoder.capacity == 512  # grew past 256 on the way
    # float32 in another order: last bits, except where that tips an int8 activation code the other way (one
    # step of the 13 for qwen3 here: 0.75% of the logits' scale)
    diff = np.abs(steps["fused"] - steps["plain"]).max(axis=1) / np.abs(steps["plain"]).max()
    assert np.sum(diff > 1e-5) <= 1 and diff.max() < 0.02, diff
    assert np.array_equal(steps["fused"].argmax(1), steps["plain"].argmax(1))
    assert np.array_equal(fused.greedy(ids[:40], 6), plain.greedy(ids[:40], 6))
    prompts = np.stack([ids[:40], ids[40:80], ids[80:120]])  # decoded as one batch: the same tokens
    assert np.array_equal(fused.greedy_many(prompts, 6), np.stack([plain.greedy(p, 6) for p in prompts]))
    prompt_s, gen_s = fused.generate(ids[:40], 6)
    assert prompt_s > 0 and gen_s > 0


def test_architectures_without_a_llama_block_decode_through_transformers():
    """Phi-3 (fused projections, partial rotary embedding), Gemma 3, a Mistral whose sliding window falls within the
    context are not the fused decoder's: it says why, and the runner keeps the transformers path."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )

    from bitsweep.backends.bitnet.decode import unsupported

    small = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0}  # fmt: skip
    assert unsupported(LlamaForCausalLM(LlamaConfig(**small)), 512) is None
    assert "'phi3'" in unsupported(Phi3ForCausalLM(Phi3Config(**small, partial_rotary_factor=0.75)), 512)
    assert "'gemma3_text'" in unsupported(Gemma3ForCausalLM(Gemma3TextConfig(**small)), 512)
    assert "hidden_act 'gelu'" in unsupported(LlamaForCausalLM(LlamaConfig(**small, hidden_act="gelu")), 512)
    mistral = MistralForCausalLM(MistralConfig(**small, sliding_window=256))
    assert "sliding-window" in unsupported(mistral, 512) and unsupported(mistral, 256) is None
