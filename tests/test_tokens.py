import pytest
import torch

from stages.common.tokens import (
    TokenError,
    add_placeholder_tokens,
    encode_prompt_ids,
    expand_trigger,
    initial_vectors,
    install_trainable_embedding,
    tokenize_prompts,
)


def test_trigger_that_is_a_vocabulary_token_is_refused(tiny_bundle):
    with pytest.raises(TokenError, match="already the vocabulary token 'cat</w>'"):
        add_placeholder_tokens(tiny_bundle.tokenizer, "cat", 1)


def test_new_tokens_get_ids_above_the_vocabulary(tiny_bundle):
    assert add_placeholder_tokens(tiny_bundle.tokenizer, "zzqtok", 3) == [49408, 49409, 49410]
    assert expand_trigger("a photo of zzqtok, zzqtokx", "zzqtok", 3) == "a photo of zzqtok zzqtok_1 zzqtok_2, zzqtokx"


def test_init_text_fills_vectors_the_automatic1111_way(tiny_bundle):
    tokenizer, weight = tiny_bundle.tokenizer, tiny_bundle.text_encoder.get_input_embeddings().weight
    ids = tokenizer("red toy", add_special_tokens=False).input_ids
    assert len(ids) == 2
    four = initial_vectors(tokenizer, weight, "red toy", 4)  # repeated: red toy red toy
    assert torch.equal(four, weight[[ids[0], ids[1], ids[0], ids[1]]])
    one = initial_vectors(tokenizer, weight, "red toy", 1)  # cut to the first
    assert torch.equal(one, weight[[ids[0]]])
    assert torch.count_nonzero(initial_vectors(tokenizer, weight, "*", 2)) == 0
    assert torch.count_nonzero(initial_vectors(tokenizer, weight, "", 2)) == 0


def test_only_the_new_rows_receive_gradients(tiny_bundle):
    tokenizer, encoder = tiny_bundle.tokenizer, tiny_bundle.text_encoder
    add_placeholder_tokens(tokenizer, "zzqtok", 2)
    base_before = encoder.get_input_embeddings().weight.detach().clone()
    trainable = install_trainable_embedding(encoder, torch.randn(2, base_before.shape[1]))
    assert [name for name, p in encoder.named_parameters() if p.requires_grad] == ["embeddings.token_embedding.new_vectors"]
    ids = tokenize_prompts(tokenizer, [expand_trigger("a photo of zzqtok", "zzqtok", 2)])
    encode_prompt_ids(encoder, ids).pow(2).mean().backward()
    assert trainable.new_vectors.grad is not None and trainable.new_vectors.grad.abs().sum() > 0
    assert trainable.base_weight.grad is None
    assert torch.equal(trainable.base_weight, base_before)


def test_clip_skip_changes_the_context(tiny_bundle):
    ids = tokenize_prompts(tiny_bundle.tokenizer, ["a photo of a cat"])
    last = encode_prompt_ids(tiny_bundle.text_encoder, ids, clip_skip=1)
    skip2 = encode_prompt_ids(tiny_bundle.text_encoder, ids, clip_skip=2)
    assert last.shape == skip2.shape == (1, 77, 32)
    assert not torch.allclose(last, skip2)
