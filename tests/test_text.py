from __future__ import annotations

import numpy as np
import pytest

from bitsweep.config import TextConfig
from bitsweep.errors import ConfigError
from bitsweep.text import Windows, make_windows, pydoc_texts, tokenize_windows, write_texts


def test_pydoc_eval_and_calibration_text_do_not_overlap():
    from pydoc_data.topics import topics

    evals, calib = pydoc_texts(0.25)
    assert len(calib) > 10_000 and len(evals) > 2 * len(calib)
    in_calib = [body for body in topics.values() if body in calib]
    assert in_calib and len(in_calib) < len(topics)
    assert not any(body in evals for body in in_calib if len(body) > 200)


def test_write_texts_records_hashes(tmp_path):
    info = write_texts(TextConfig(), tmp_path / "e.txt", tmp_path / "c.txt")
    assert info["eval_chars"] == len((tmp_path / "e.txt").read_text())
    assert len(info["eval_sha256"]) == 64


def test_make_windows_shapes_and_errors():
    w = make_windows(list(range(100)), 16, 3)
    assert w.shape == (3, 16) and w[1, 0] == 16
    with pytest.raises(ConfigError, match="too short for one window"):
        make_windows(list(range(10)), 16, 1)
    with pytest.raises(ConfigError, match="asked for n_windows=7"):
        make_windows(list(range(100)), 16, 7)


def test_windows_round_trip_and_decode_hashes(tmp_path, tiny_model_dir):
    text = tmp_path / "eval.txt"
    text.write_text(pydoc_texts(0.25)[0][:20_000])
    windows = tokenize_windows(tiny_model_dir, text, 64, 3)
    windows.save(tmp_path / "w.npz")
    again = Windows.load(tmp_path / "w.npz")
    assert np.array_equal(again.ids, windows.ids) and again.digest == windows.digest
    assert len(set(again.decoded_sha256)) == 3
