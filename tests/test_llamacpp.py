"""llama.cpp backend on a tiny random Llama: real converter, real llama-quantize, real llama-cpp-python."""

from __future__ import annotations

import numpy as np
import pytest

from bitsweep.backends import Artifact, QuantizeRequest, get_backend
from bitsweep.backends.llamacpp import LlamaCppRunner, LlamaCppToolError, gguf_summary
from bitsweep.backends.torch_ref import TorchRunner
from bitsweep.config import SchemeConfig
from bitsweep.metrics import ReferenceTopK, kl_divergence

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

IDS = np.array(
    [504, 3458, 314, 253, 1345, 28, 1097, 2049, 30, 216, 5248, 198, 7, 44, 17, 901] * 4, dtype=np.int32
)


def quantize(tiny_gguf, tmp_path, qtype: str, bits: int) -> Artifact:
    scheme = SchemeConfig("llamacpp", qtype.lower(), bits, {"type": qtype, "imatrix": False})
    return get_backend("llamacpp").quantize(
        QuantizeRequest(src=tiny_gguf, scheme=scheme, settings={"threads": 2}, out=tmp_path / qtype)
    )


def test_converted_f32_gguf_matches_torch(tiny_model_dir, tiny_gguf):
    torch_logits = TorchRunner(tiny_model_dir, threads=2).logits(IDS)
    runner = LlamaCppRunner(tiny_gguf, threads=2, n_ctx=128)
    try:
        llama_logits = runner.logits(IDS)
        assert runner.detokenize(IDS) == TorchRunner(tiny_model_dir, 1).detokenize(IDS)
    finally:
        runner.close()
    assert llama_logits.shape == torch_logits.shape == (len(IDS), 49152)
    assert np.abs(llama_logits - torch_logits).max() < 1e-3


def test_quantized_files_hold_the_types_and_sizes_claimed(tiny_gguf, tmp_path):
    q8 = quantize(tiny_gguf, tmp_path, "Q8_0", 8)
    q4 = quantize(tiny_gguf, tmp_path, "Q4_0", 4)
    assert q8.meta["applied"]["tensor_types"].get("Q8_0", 0) >= 14  # every 2-D weight of the 2 layers
    assert "Q4_0" in q4.meta["applied"]["tensor_types"]
    assert 8.0 < q8.meta["applied"]["bpw"] < 9.0
    assert q4.meta["applied"]["bpw"] < q8.meta["applied"]["bpw"]
    assert q4.model_file.stat().st_size < q8.model_file.stat().st_size
    assert gguf_summary(q8.model_file) == Artifact.load(q8.path).meta["applied"]


def test_kl_divergence_orders_with_bits(tiny_gguf, tmp_path):
    ref = LlamaCppRunner(tiny_gguf, threads=2, n_ctx=128)
    top = ReferenceTopK.from_logits(ref.logits(IDS), 64)
    ref.close()
    kld = {}
    for qtype, bits in (("Q8_0", 8), ("Q4_0", 4)):
        runner = get_backend("llamacpp").load(
            quantize(tiny_gguf, tmp_path, qtype, bits), threads=2, n_ctx=128
        )
        kld[qtype] = kl_divergence(top, runner.logits(IDS)).mean()
        prompt_s, gen_s = runner.generate(IDS[:16], 4)
        assert prompt_s > 0 and gen_s > 0
        runner.close()
    assert 0 < kld["Q8_0"] < kld["Q4_0"]


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    scheme = SchemeConfig("llamacpp", "q8_0", 8, {"type": "Q8_0"})
    with pytest.raises(LlamaCppToolError, match="llama-quantize failed with exit code"):
        get_backend("llamacpp").quantize(QuantizeRequest(bad, scheme, {"threads": 1}, tmp_path / "out"))
