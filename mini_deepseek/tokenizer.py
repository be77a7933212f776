"""A byte-level tokenizer: every UTF-8 byte is a token, plus a few special tokens.

DeepSeek-V3 uses a 128K byte-level BPE vocabulary. BPE only merges frequent byte runs into single tokens, so a byte
tokenizer is the same idea with no merges: it needs no training, no files to download, and can encode any text.
The price is longer sequences (one token per byte), which a toy model can afford.

    ids 0..255   the bytes themselves
    256          <|bos|>   beginning of a sequence
    257          <|eos|>   end of a sequence
    258          <|pad|>   padding in a batch
    259..263     <|reserved_0|> .. <|reserved_4|>, free for later chapters (e.g. think tags)

encode() never turns text like "<|eos|>" into a special id: special tokens only enter through the bos/eos flags
or by id, so text from a file cannot forge them. decode() renders special ids by name (or drops them with
skip_special=True), so what the model emitted stays visible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

N_BYTES = 256
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>") + tuple(f"<|reserved_{i}|>" for i in range(5))


class ByteTokenizer:
    vocab_size = N_BYTES + len(SPECIAL_TOKENS)  # 264, the vocab_size of the "toy" and "small" presets
    bos_id = N_BYTES + 0
    eos_id = N_BYTES + 1
    pad_id = N_BYTES + 2

    def token_id(self, name: str) -> int:
        """Id of a special token by name, e.g. "<|eos|>" -> 257."""
        if name not in SPECIAL_TOKENS:
            raise ValueError(f"unknown special token {name!r}; choose one of {SPECIAL_TOKENS}")
        return N_BYTES + SPECIAL_TOKENS.index(name)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """text -> its UTF-8 bytes as ids, optionally wrapped in <|bos|> ... <|eos|>."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special: bool = False) -> str:
        """ids -> text. Runs of byte ids are decoded as UTF-8 (invalid bytes become U+FFFD, as a model may emit
        half a character); special ids become their names, or nothing with skip_special=True."""
        ids = self._check_ids(ids)
        pieces: list[str] = []
        byte_run = bytearray()
        for i in ids:
            if i < N_BYTES:
                byte_run.append(i)
                continue
            # Decode the bytes gathered so far on their own: a special token ends any multi-byte character.
            pieces.append(byte_run.decode("utf-8", errors="replace"))
            byte_run.clear()
            if not skip_special:
                pieces.append(SPECIAL_TOKENS[i - N_BYTES])
        pieces.append(byte_run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     padding_side: str = "right") -> torch.Tensor:
        """Several texts -> LongTensor [B, T_max], padded with <|pad|>. Left padding lines up the last tokens,
        which is what batched generation wants; right padding lines up the first ones."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side = {padding_side!r}: must be 'left' or 'right'")
        rows = [self.encode(text, bos=bos, eos=eos) for text in texts]
        if not rows:
            raise ValueError("encode_batch() needs at least one text")
        width = max(len(row) for row in rows)
        batch = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            start = 0 if padding_side == "right" else width - len(row)
            batch[b, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        return batch

    def decode_batch(self, batch: torch.Tensor | Sequence[Sequence[int]], skip_special: bool = True) -> list[str]:
        """[B, T] ids -> B texts; padding and other specials are dropped by default."""
        return [self.decode(row, skip_special=skip_special) for row in batch]

    def _check_ids(self, ids: Iterable[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode() takes a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for position, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} at position {position} is outside the vocabulary "
                                 f"0..{self.vocab_size - 1} of ByteTokenizer")
        return ids


R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")  # DeepSeek-R1's output format (R1 paper, Table 1)


class TagTokenizer(ByteTokenizer):
    """ByteTokenizer that writes the four tags of DeepSeek-R1's output format as single tokens.

    "<think>", "</think>", "<answer>" and "</answer>" take the ids of <|reserved_0|> .. <|reserved_3|> (259..262),
    so a tag costs one token instead of 7 to 9 bytes: a third of a short worked answer. R1's released tokenizer
    likewise has single tokens for <think> and </think>. Unlike ByteTokenizer, encode() does turn these four texts
    into their ids (they are meant to be typed); every other special token still enters by id only.
    """

    tag_ids = {tag: N_BYTES + 3 + i for i, tag in enumerate(R1_TAGS)}  # "<think>" -> 259, ...

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = []
        for piece in _TAG_PATTERN.split(text):  # the pattern's group keeps the tags: "a<think>b" -> a, <think>, b
            ids += [self.tag_ids[piece]] if piece in self.tag_ids else list(piece.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special: bool = False) -> str:
        """ids -> text, the tag ids as their tags (also with skip_special=True: they are part of the text)."""
        text_of = {i: tag for tag, i in self.tag_ids.items()}
        expanded: list[int] = []
        for i in self._check_ids(ids):
            expanded += list(text_of[i].encode("utf-8")) if i in text_of else [i]
        return super().decode(expanded, skip_special=skip_special)


_TAG_PATTERN = re.compile("(" + "|".join(map(re.escape, R1_TAGS)) + ")")
