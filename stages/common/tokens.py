"""New tokens for an embedding: trigger-word checks, initial vectors, prompt expansion, encoding."""
from __future__ import annotations

import re

import torch
from torch import nn

from stages.common.trigger import PROMPT_TOKEN_BUDGET, TokenError, check_trigger, init_token_ids, placeholder_tokens  # noqa: F401 (re-exported)


def add_placeholder_tokens(tokenizer, trigger: str, vectors: int) -> list[int]:
    """Add the embedding's tokens to `tokenizer` and return their ids (at or above the base vocabulary size)."""
    check_trigger(tokenizer, trigger, vectors)
    tokens = placeholder_tokens(trigger, vectors)
    tokenizer.add_tokens(tokens)
    return tokenizer.convert_tokens_to_ids(tokens)


def initial_vectors(tokenizer, token_embedding: torch.Tensor, init_text: str, vectors: int) -> torch.Tensor:
    """AUTOMATIC1111's initialisation: the init text's token vectors, stretched over `vectors`.

    As in AUTOMATIC1111's create_embedding, vector i takes token i * tokens // vectors, so
    "red toy" over 4 vectors is red red toy toy. An empty init text gives zeros; "*" is a word
    like any other (the `*` token's vector). More tokens than vectors is refused (SPEC §5):
    AUTOMATIC1111 would silently drop the words that do not fit.
    """
    result = torch.zeros(vectors, token_embedding.shape[1], dtype=torch.float32)
    ids = init_token_ids(tokenizer, init_text, vectors)
    if not ids:
        return result
    source = token_embedding[torch.tensor(ids)].float()
    for i in range(vectors):
        result[i] = source[i * len(ids) // vectors]
    return result


def _whole_word(trigger: str) -> str:
    # `demotok-neg` and `mydemotok` are other words: a trigger ends at a letter, digit, _ or - boundary
    return rf"(?<![\w-]){re.escape(trigger)}(?![\w-])"


def expand_trigger(prompt: str, trigger: str, vectors: int) -> str:
    """Replace each whole-word trigger with the embedding's tokens (`demotok` → `demotok demotok_1`)."""
    tokens = " ".join(placeholder_tokens(trigger, vectors))
    return re.sub(_whole_word(trigger), tokens, prompt)


def without_trigger(prompt: str, trigger: str, replacement: str = "") -> str:
    """The prompt with the trigger word replaced (by the init text, say) or removed, for a grid's baseline column."""
    text = re.sub(_whole_word(trigger), replacement, prompt)
    return re.sub(r"\s+([,.])", r"\1", re.sub(r"\s{2,}", " ", text)).strip(" ,")


def negative_prompt(prompt: str, trigger: str, negative_trigger: str) -> str:
    """APT's negative prompt: the training prompt with the trigger word swapped for the negative embedding's (DreamArtist's rule)."""
    return re.sub(_whole_word(trigger), negative_trigger, prompt)


def tokenize_prompts(tokenizer, prompts: list[str], pad_with_eos: bool = True) -> torch.Tensor:
    """Token ids [batch, 77]: <|startoftext|> prompt <|endoftext|> padding, cut to the window."""
    encoded = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
    ids = encoded.input_ids
    if not pad_with_eos:
        ids = ids.masked_fill(encoded.attention_mask == 0, 0)  # OpenCLIP pads with "!" (id 0)
    return ids


class TrainableTokenEmbedding(nn.Module):
    """A token embedding whose base vocabulary is frozen and whose new rows are the only parameters.

    No gradient, optimizer state or write-back ever touches the 49,408 base rows.
    """

    def __init__(self, base: nn.Embedding, *blocks: torch.Tensor):
        super().__init__()
        self.base_weight = base.weight  # shared with the text encoder, frozen
        self.base_size = base.weight.shape[0]
        # one block of rows per embedding, in the order their tokens were added (APT: the run's, then {run}-neg)
        self.blocks = nn.ParameterList([nn.Parameter(block.to(base.weight.dtype).clone()) for block in blocks])

    def new_rows(self) -> torch.Tensor:
        return self.blocks[0] if len(self.blocks) == 1 else torch.cat(list(self.blocks))

    @property
    def weight(self) -> torch.Tensor:  # what code asking the embedding for its matrix expects
        return torch.cat([self.base_weight, self.new_rows().detach()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.base_size
        base = nn.functional.embedding(input_ids.clamp(max=self.base_size - 1), self.base_weight)
        rows = self.new_rows()
        new = rows[(input_ids - self.base_size).clamp(min=0, max=rows.shape[0] - 1)]
        return torch.where(is_new.unsqueeze(-1), new.to(base.dtype), base)


def install_trainable_embedding(text_encoder: nn.Module, *blocks: torch.Tensor) -> TrainableTokenEmbedding:
    """Swap the text encoder's token embedding for one whose new rows (one block per embedding) are trainable; return it."""
    embeddings = text_encoder.get_input_embeddings()
    trainable = TrainableTokenEmbedding(embeddings, *blocks)
    text_encoder.set_input_embeddings(trainable)
    return trainable


def encode_text(text_encoder: nn.Module, input_ids: torch.Tensor, clip_skip: int = 1, penultimate: bool = False,
                pooled_eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states the UNet attends to, pooled projection or None) for token ids.

    SD1/SD2 (AUTOMATIC1111's clip-skip rule): clip_skip=N takes the N-th layer from the end and
    applies the final layer norm. SDXL (`penultimate`) takes the layer before that, without the
    norm: hidden_states[-2] at clip_skip 1. With `pooled_eos_id`, also the projected end-of-text
    state (SDXL's pooled prompt), found at the first end-of-text token: transformers' own pooling
    takes the highest token id when a config has the legacy eos_token_id 2, which is a new token's.
    """
    outer = getattr(text_encoder, "text_model", text_encoder)  # CLIPTextModelWithProjection keeps a text_model level
    if clip_skip == 1 and not penultimate and pooled_eos_id is None:
        return text_encoder(input_ids).last_hidden_state, None
    output = text_encoder(input_ids, output_hidden_states=True)
    if penultimate:
        hidden = output.hidden_states[-1 - clip_skip]
    elif clip_skip == 1:
        hidden = output.last_hidden_state
    else:
        hidden = outer.final_layer_norm(output.hidden_states[-clip_skip])
    if pooled_eos_id is None:
        return hidden, None
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    eos_positions = (input_ids == pooled_eos_id).int().argmax(dim=-1)
    pooled = output.last_hidden_state[rows, eos_positions]  # last_hidden_state has the final norm, as CLIP pools it
    return hidden, text_encoder.text_projection(pooled)
