"""HF -> stateful fp32 OpenVINO IR with optimum-intel's exporter.

Why optimum-intel's exporter: it gives a stateful IR (KV cache inside the model, so generation speed is real)
from the same transformers version as the reference, and it resolves with the pinned stack (1.27.0). The
converted IR is fp32 (``OVConfig(dtype="fp32")``): compression starts from the reference weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def convert(model_dir: Path, out: Path, options: dict[str, Any], trust_remote_code: bool = False) -> None:
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    main_export(
        str(model_dir), str(out), task="text-generation-with-past", stateful=True, ov_config=OVConfig(dtype="fp32"),
        convert_tokenizer=False, trust_remote_code=trust_remote_code,
    )  # fmt: skip


export_openvino = convert
