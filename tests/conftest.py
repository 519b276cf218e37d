import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project is flat scripts, not a package
SHARED = os.path.normpath(os.path.join(ROOT, '..', 'shared'))


@pytest.fixture
def shared_dir():
    """../shared (SPEC, official key layout, sample videos); tests that need it skip without it."""
    if not os.path.isdir(SHARED):
        pytest.skip(f'{SHARED} is absent (it holds the official key layout and sample videos)')
    return SHARED
