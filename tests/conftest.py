"""Shared fixtures for the course's tests.

The environment defaults are set before anything imports ``transformers`` or ``huggingface_hub``
(both read ``HF_HUB_OFFLINE`` at import time): no test may touch the network, plots render
without a display, and the ``tiny`` profile is the default.
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("COURSE_PROFILE"):
    os.environ["COURSE_PROFILE"] = "tiny"

import pytest  # noqa: E402  (after the environment defaults above)

# Small enough to build in milliseconds, big enough to exercise every code path.
TINY_SIZES = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: runs notebooks or trains real models end to end (minutes); deselect with -m 'not slow'",
    )


@pytest.fixture(autouse=True)
def _checkers_accept_the_references():
    """The tests run every checker on the course's own implementation (which a learner's check
    refuses in place of theirs: ``tests/test_checks.py`` tests that refusal)."""
    from utils.checks.core import references_allowed

    with references_allowed():
        yield


@pytest.fixture(scope="session")
def corpus_texts():
    """The texts of 2000 TinyWorld pretraining documents (seed 0)."""
    from utils.world import pretraining_documents

    return [d["text"] for d in pretraining_documents(2000)]


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_texts):
    """A BPE tokenizer trained on 2000 TinyWorld documents. Shared: do not mutate it (copy it)."""
    from utils.tokenizer import train_tokenizer

    return train_tokenizer(corpus_texts)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """A freshly initialised one-layer Llama (~35k parameters). Shared: deepcopy before training it."""
    from utils.models import make_model

    return make_model(tiny_tokenizer, **TINY_SIZES).eval()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Point the artifact cache (``COURSE_CACHE``) at an empty temporary folder."""
    root = tmp_path / "artifact-cache"
    monkeypatch.setenv("COURSE_CACHE", str(root))
    return root


@pytest.fixture
def tmp_datasets_cache(tmp_path, monkeypatch):
    """Keep ``datasets``' own cache (local file loads write arrow files) inside the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    return tmp_path / "hf-datasets-cache"
