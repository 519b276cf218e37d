"""scripts/synth.py writes the same clips, byte for byte, as the code it was moved from (data.py
synth at commit d9477a5, read back from git), with default settings and with every noise option."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = 'd9477a5'  # main before the tools moved out of data.py
OPTIONS = [[], ['--seed', '3', '--num_classes', '5', '--on_slots', '3', '6', '--offscreen', '0.3',
                '--silent_objects', '0.4', '--clutter', '2', '--hum', '0.05']]


def old_data_py(tmp_path):
    """data.py as it was before the move, in a folder of its own (it imports nothing of the repo)."""
    proc = subprocess.run(['git', '-C', ROOT, 'show', f'{BEFORE}:data.py'], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f'commit {BEFORE} is not in this checkout: {proc.stderr.decode().strip()}')
    path = tmp_path / 'old' / 'data.py'
    path.parent.mkdir()
    path.write_bytes(proc.stdout)
    return str(path)


def files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read()
            for d, _, names in os.walk(root) for f in names}


@pytest.mark.parametrize('options', OPTIONS, ids=['defaults', 'noise'])
def test_synth_equals_the_code_before_the_move(tmp_path, options):
    old = old_data_py(tmp_path)
    common = ['--num_clips', '12', '--frame_size', '32'] + options
    env = dict(os.environ, OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, old, 'synth', '--out', str(tmp_path / 'a')] + common,
                   check=True, capture_output=True, env=env)
    subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'synth.py'),
                    '--out', str(tmp_path / 'b')] + common, check=True, capture_output=True, env=env)
    a, b = files(tmp_path / 'a'), files(tmp_path / 'b')
    assert len(a) == 5 + 12 * 33 and sorted(a) == sorted(b)
    assert [f for f in a if a[f] != b[f]] == []


def test_help_shows_the_design(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'synth.py'), '--help'],
                         check=True, capture_output=True, text=True).stdout
    assert 'Held-out split: every 5th clip' in out and '--silent_objects' in out
