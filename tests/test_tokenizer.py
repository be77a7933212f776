import pytest
import torch

from mini_deepseek.config import ModelConfig
from mini_deepseek.tokenizer import SPECIAL_TOKENS, ByteTokenizer, TagTokenizer

tok = ByteTokenizer()


def test_vocab_matches_the_small_presets():
    assert tok.vocab_size == 264 == len(SPECIAL_TOKENS) + 256
    assert tok.vocab_size == ModelConfig.preset("toy").vocab_size == ModelConfig.preset("small").vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert tok.token_id("<|reserved_4|>") == 263
    with pytest.raises(ValueError, match="unknown special token"):
        tok.token_id("<|think|>")


@pytest.mark.parametrize("text", ["", "hello, world", "déjà vu ∑ 🐋\n\ttabs", "\x00\x7f"])
def test_round_trip(text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_bos_eos_and_special_names():
    assert tok.encode("A", bos=True, eos=True) == [256, 65, 257]
    assert tok.decode([256, 65, 257]) == "<|bos|>A<|eos|>"
    assert tok.decode([256, 65, 257, 258], skip_special=True) == "A"
    # Text that looks like a special token stays text: only the flags (or ids) make specials.
    assert max(tok.encode("<|eos|>")) < 256
    assert tok.decode(tok.encode("<|eos|>")) == "<|eos|>"


def test_broken_utf8_becomes_replacement_characters():
    euro = list("€".encode())  # 3 bytes
    assert tok.decode(euro[:2]) == "\ufffd"
    # A special token in the middle of a character ends it: both halves are replaced, the special shown.
    assert tok.decode(euro[:1] + [tok.eos_id] + euro[1:]) == "\ufffd<|eos|>\ufffd\ufffd"


@pytest.mark.parametrize("bad", [[65, 264], [-1], [1000]])
def test_ids_out_of_range_are_rejected(bad):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode(bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding(side):
    batch = tok.encode_batch(["ab", "", "ü"], bos=True, padding_side=side)
    assert batch.shape == (3, 3) and batch.dtype == torch.long
    rows = {"right": [[256, 97, 98], [256, 258, 258], [256, 0xC3, 0xBC]],
            "left": [[256, 97, 98], [258, 258, 256], [256, 0xC3, 0xBC]]}[side]
    assert batch.tolist() == rows
    assert tok.decode_batch(batch) == ["ab", "", "ü"]
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(["a"], padding_side="middle")


def test_tag_tokenizer_writes_the_r1_tags_as_single_tokens():
    tags = TagTokenizer()
    text = "<think>7+5=12</think> <answer>12</answer>"
    ids = tags.encode(text, eos=True)
    assert ids[0] == tags.token_id("<|reserved_0|>") == 259 and ids.count(262) == 1 and ids[-1] == tags.eos_id
    assert len(ids) == len(text.encode()) - (7 + 8 + 8 + 9) + 4 + 1
    assert tags.decode(ids) == text + "<|eos|>" and tags.decode(ids, skip_special=True) == text
    assert tags.decode(tok.encode(text)) == text  # the plain bytes still read the same
    assert tags.encode("a<thinking>b") == list(b"a<thinking>b")  # only the four exact tags
