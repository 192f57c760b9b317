from transformers import CLIPTokenizer

from stages.common.clip_vocab import VOCAB_SIZE, build_clip_tokenizer, write_tokenizer_files


def test_real_clip_vocabulary_ids():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_folder_tokenizer_matches_object_tokenizer(tmp_path):
    # parity guard: in transformers 5 the vocab_file= form silently gives a 3-token vocabulary
    from_folder = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_path / "tokenizer"))
    built = build_clip_tokenizer()
    assert len(from_folder) == 49408
    for text in ["a photo of a cat", "masterpiece, 1girl, (blue_dress:1.2), 日本語 émoji", "SKS Dog!!"]:
        assert from_folder(text).input_ids == built(text).input_ids


def test_padding_reaches_the_77_token_window():
    ids = build_clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407
