import pytest
import torch

from stages.common.tokens import (
    TokenError,
    add_placeholder_tokens,
    encode_text,
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


def a1111_initial_vectors(tokenizer, weight, init_text: str, nvpt: int) -> torch.Tensor:
    """AUTOMATIC1111's create_embedding (modules/textual_inversion/textual_inversion.py), restated as the reference:
    embed `init_text or '*'` (cut to nvpt tokens), then vec[i] = embedded[i * len(embedded) // nvpt]; zeros unless init_text."""
    ids = tokenizer(init_text or "*", max_length=nvpt, truncation=True, add_special_tokens=False).input_ids
    embedded = weight[torch.tensor(ids)]
    vec = torch.zeros((nvpt, weight.shape[1]))
    if init_text:
        for i in range(nvpt):
            vec[i] = embedded[i * int(embedded.shape[0]) // nvpt]
    return vec


@pytest.mark.parametrize("init_text, vectors", [("red toy", 4), ("red toy", 3), ("red toy", 2), ("cat", 5), ("*", 2), ("", 3)])
def test_init_text_fills_vectors_the_automatic1111_way(tiny_bundle, init_text, vectors):
    tokenizer, weight = tiny_bundle.tokenizer, tiny_bundle.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(initial_vectors(tokenizer, weight, init_text, vectors), a1111_initial_vectors(tokenizer, weight, init_text, vectors))


def test_init_text_is_stretched_not_tiled_and_star_is_a_word(tiny_bundle):
    tokenizer, weight = tiny_bundle.tokenizer, tiny_bundle.text_encoder.get_input_embeddings().weight.detach()
    red, toy = tokenizer("red toy", add_special_tokens=False).input_ids
    assert torch.equal(initial_vectors(tokenizer, weight, "red toy", 4), weight[[red, red, toy, toy]])  # not red toy red toy
    star = tokenizer("*", add_special_tokens=False).input_ids
    assert torch.equal(initial_vectors(tokenizer, weight, "*", 2), weight[star * 2])  # the * token, not zeros
    assert torch.count_nonzero(initial_vectors(tokenizer, weight, "", 2)) == 0  # only an empty init text gives zeros
    with pytest.raises(TokenError, match="is 2 tokens but the embedding has vectors: 1"):
        initial_vectors(tokenizer, weight, "red toy", 1)  # SPEC §5: refused rather than cut as AUTOMATIC1111 does


def test_only_the_new_rows_receive_gradients(tiny_bundle):
    tokenizer, encoder = tiny_bundle.tokenizer, tiny_bundle.text_encoder
    add_placeholder_tokens(tokenizer, "zzqtok", 2)
    base_before = encoder.get_input_embeddings().weight.detach().clone()
    trainable = install_trainable_embedding(encoder, torch.randn(2, base_before.shape[1]))
    assert [name for name, p in encoder.named_parameters() if p.requires_grad] == ["embeddings.token_embedding.blocks.0"]
    ids = tokenize_prompts(tokenizer, [expand_trigger("a photo of zzqtok", "zzqtok", 2)])
    encode_text(encoder, ids)[0].pow(2).mean().backward()
    assert trainable.blocks[0].grad is not None and trainable.blocks[0].grad.abs().sum() > 0
    assert trainable.base_weight.grad is None
    assert torch.equal(trainable.base_weight, base_before)


def test_clip_skip_changes_the_context(tiny_bundle):
    ids = tokenize_prompts(tiny_bundle.tokenizer, ["a photo of a cat"])
    last = encode_text(tiny_bundle.text_encoder, ids, clip_skip=1)[0]
    skip2 = encode_text(tiny_bundle.text_encoder, ids, clip_skip=2)[0]
    assert last.shape == skip2.shape == (1, 77, 32)
    assert not torch.allclose(last, skip2)
