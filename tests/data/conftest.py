"""Fixtures for the data-layer tests: the shared real-data folder and tokenizers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import pytest

from jaxalign.data import TiktokenTokenizer, byte_tokenizer, gpt2_tokenizer

# The project's read-only data lives next to the repository (see shared/data/README.md); it is
# never copied into the repo, and a user's checkout usually lacks it.
SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the Arrow files that ``datasets.load_dataset`` prepares in a per-session temp dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))
        yield


@pytest.fixture(scope="session")
def shared_file() -> Callable[[str], Path]:
    """``shared_file("sft/instruction-data.json")``: the path, or skip the test if it is absent."""

    def find(relative: str) -> Path:
        path = SHARED_DATA / relative
        if not path.is_file():
            pytest.skip(f"shared data file {path} not found (the folder ../shared/data is absent)")
        return path

    return find


@pytest.fixture(scope="session")
def gpt2(shared_file: Callable[[str], Path]) -> TiktokenTokenizer:
    """GPT-2 tokenizer built offline from the shared ``gpt2.tiktoken`` ranks."""
    return gpt2_tokenizer(shared_file("tokenizers/gpt2/gpt2.tiktoken"))


@pytest.fixture(scope="session")
def byte_tok() -> TiktokenTokenizer:
    """The 257-id byte-level tokenizer."""
    return byte_tokenizer()
