"""The install: exact pins, torchaudio loads and computes an fbank, and a torchaudio that does not load
(a wheel built for another torch) stops the first command with the installed and pinned versions."""
import math
import os
import re
import subprocess
import sys
from importlib import metadata

import numpy as np
import torch

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_requirements_are_exact_pins_with_torch_and_torchaudio_together():
    lines = [line.strip() for line in open(os.path.join(ROOT, 'requirements.txt'))]
    pins = dict(line.split('==') for line in lines if line and not line.startswith('#'))
    assert all(re.fullmatch(r'\d+(\.\d+)+', v) for v in pins.values()), pins  # no ranges, no wildcards
    assert set(pins) == {'torch', 'torchaudio', 'numpy', 'soundfile', 'pillow', 'tqdm', 'pytest'}
    assert pins['torch'] == pins['torchaudio']  # torchaudio X.Y.Z is built for torch X.Y.Z


def test_one_fbank_through_torchaudio():
    """A 1 kHz tone: 1024 rows of 128 mel bins, the loudest bin the one whose centre is nearest 1 kHz
    (HTK mel scale over 20 Hz .. 8 kHz, written out here)."""
    t = np.arange(10 * data.SAMPLE_RATE) / data.SAMPLE_RATE
    tone = torch.tensor(0.5 * np.sin(2 * math.pi * 1000 * t), dtype=torch.float32)[None]
    fbank = data.fbank_frames(data.mono_16k(tone, data.SAMPLE_RATE), 128)
    assert fbank.shape == (1024, 128) and torch.isfinite(fbank).all()
    mel = lambda f: 1127 * math.log(1 + f / 700)  # noqa: E731
    lo, hi = mel(20), mel(8000)
    centres = [lo + (hi - lo) * (m + 1) / 129 for m in range(128)]
    expected = min(range(128), key=lambda m: abs(centres[m] - mel(1000)))
    assert int(fbank[100:900].mean(dim=0).argmax()) == expected


def test_a_torchaudio_that_does_not_load_names_both_pairs(tmp_path):
    fake = tmp_path / 'torchaudio'
    fake.mkdir()
    (fake / '__init__.py').write_text(
        "raise OSError('libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace')\n")
    env = {**os.environ, 'PYTHONPATH': f'{tmp_path}{os.pathsep}{ROOT}'}
    proc = subprocess.run([sys.executable, '-c', 'import data'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert 'Traceback' not in proc.stderr
    assert f"installed: torch {metadata.version('torch')} with torchaudio {metadata.version('torchaudio')}" in proc.stderr
    assert 'this project pins torch==2.11.0 with torchaudio==2.11.0' in proc.stderr
    assert 'undefined symbol' in proc.stderr
