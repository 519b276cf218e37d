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


@pytest.fixture
def one_thread():
    """Small ops on a shared 2-core machine run several times faster on one thread."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
