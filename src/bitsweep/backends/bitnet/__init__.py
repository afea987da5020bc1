"""Backend ``bitnet``: the HF model with its Linear layers packed into bitsweep's own low-bit formats
(bitsweep.kernels), run by its numba kernels. Reads the HF folder directly (no conversion). Capability data only.
"""

from __future__ import annotations

from typing import Any

from bitsweep.backends.base import HF_FORMAT, BackendInfo, BackendSettings, Footprint
from bitsweep.errors import ConfigError

# bitsweep's own packed formats (bitsweep.kernels.formats) and their bit class: the ternary layouts sit where
# llama.cpp puts TQ2_0 (2) and TQ1_0 (1).
BITNET_FORMATS: dict[str, int] = {"TQ2_0": 2, "TQ1_0": 1, "BINARY": 1, "INT2": 2, "INT3": 3, "INT4": 4}


class BitnetInfo(BackendInfo):
    def preflight(self, settings: BackendSettings) -> None:
        """The kernels' environment overrides ($BITSWEEP_KERNEL_ISA, $BITSWEEP_KERNEL_PREFETCH,
        $BITSWEEP_HUGE_PAGES) read as the jobs will read them: a typo stops the workflow before any job runs."""
        from bitsweep.kernels import host, memory

        host.requested_isa()
        host.software_prefetch()
        memory.huge_pages_wanted()

    def check_options(self, where: str, options: dict[str, Any]) -> None:
        """The scheme's options as the quantizer reads them (activation mode, head format, ...), at config time."""
        from bitsweep.backends.bitnet.quantize import scheme_settings

        try:
            scheme_settings(options)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


INFO = BitnetInfo(
    # peak memory (bitsweep.planning): the fp32 torch model is built before its linears are packed
    quantize_footprint=Footprint(400, 8.0),
    evaluate_footprint=Footprint(700, 8.0),
    name="bitnet",
    one_core_quantizer=True,  # packing in NumPy/numba: 0.95 cores (default sweep, 2-core host)
    package=__name__,
    settings=BackendSettings,  # threads and mem_mb only
    source_format=HF_FORMAT,
    type_key="format",
    type_bits=BITNET_FORMATS,
    options=frozenset(
        {"format", "scale", "group_size", "layers", "act", "keep_dtype", "head", "head_group_size"}
    ),
    # Same numbers on every x86 host: int8 activation rounding turns a last-bit difference in the float parts
    # (torch's attention, norms and softmax) into a different code, and on SmolLM2 int4_g64 into logits up to 4
    # apart (measured here: torch's AVX2 kernels vs its baseline ones). Torch's vector kernels, MKL's GEMMs and
    # oneDNN are held to their AVX2 code paths (MKL's "conditional numerical reproducibility"), the widest every
    # host of this project has; the packed layers are exact on their own (the packed kernels and
    # kernels.fast.gemm_exact give the same bits on every ISA).
    evaluate_env={"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
)
