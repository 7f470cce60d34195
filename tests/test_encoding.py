"""Encoding: finding the identifier's tokens (the VAE and text-encoder paths are exercised by training tests)."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from conftest import write_tiny_tokenizer
from dreambooth.encoding import identifier_token_ids
from dreambooth.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def ids(tokenizer, text: str) -> set[int]:
    return set(tokenizer(text, add_special_tokens=False).input_ids)


def test_the_identifier_is_what_the_instance_prompt_has_and_the_class_prompt_lacks(tokenizer):
    found = identifier_token_ids(tokenizer, "a photo of miru cat", "a photo of a cat", None)
    assert set(found) == ids(tokenizer, "miru") and not set(found) & ids(tokenizer, "a photo of cat")


def test_a_named_identifier_wins(tokenizer):
    assert set(identifier_token_ids(tokenizer, "a photo of miru cat", None, "miru")) == ids(tokenizer, "miru")


def test_no_identifier_to_find_is_named(tokenizer):
    with pytest.raises(UserError, match="--identifier"):
        identifier_token_ids(tokenizer, "a photo of a cat", "a photo of a cat", None)
    with pytest.raises(UserError, match="--identifier WORD"):
        identifier_token_ids(tokenizer, "a photo of miru cat", None, None)
