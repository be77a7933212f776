"""Offline training data: synthetic arithmetic with worked steps, text already on this machine, and batches.

Nothing here downloads anything. Two sources of text:
- `arithmetic_problems` / `arithmetic_text`: "Q: 37+48=? A: 7+8=15 carry 1; 3+4+1=8; so 85" and friends,
  generated from a seed. Each problem knows its answer, so a rule can score a model's reply (GRPO, chapter 06).
- `stdlib_corpus` (the Python standard library's own sources and text files) and `text_files_corpus` (yours).

`TokenDataset.get_batch(step, ...)` is a pure function of (seed, split, step): a resumed run draws exactly the
batches the uninterrupted run would have drawn, without saving any sampler state.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sysconfig
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .tokenizer import ByteTokenizer

# ----------------------------------------------------------------------------------------------------------------
# Synthetic arithmetic with worked steps

ARITHMETIC_KINDS = ("add", "sub", "mul")


@dataclass(frozen=True)
class Problem:
    prompt: str  # "Q: 37+48=? A:" - what the model is given
    completion: str  # " 7+8=15 carry 1; 3+4+1=8; so 85\n" - the worked answer it should produce
    answer: int  # 85

    @property
    def text(self) -> str:
        """The whole training example: prompt followed by completion."""
        return self.prompt + self.completion


def _digits(n: int, width: int) -> list[int]:
    """Least significant digit first, zero-padded to width: _digits(37, 3) == [7, 3, 0]."""
    return [int(c) for c in reversed(str(n).zfill(width))]


def _add_steps(a: int, b: int) -> list[str]:
    # Column addition from the right; a carry out of the last column becomes the leading digit.
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width), strict=True):
        total = da + db + carry
        step = f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={total}"
        carry = total // 10
        steps.append(step + (f" carry {carry}" if carry else ""))
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    # Column subtraction (a >= b); a column that comes up short borrows 10 from the next one.
    width = len(str(a))
    steps, borrow = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width), strict=True):
        short = da - db - borrow < 0
        top = da + 10 if short else da
        result = top - db - borrow
        step = f"{top}-{db}" + (f"-{borrow}" if borrow else "") + f"={result}"
        borrow = 1 if short else 0
        steps.append(step + (" borrow 1" if short else ""))
    return steps


def _mul_steps(a: int, digit: int) -> list[str]:
    # Multiply each digit of a by one digit from the right, carrying the tens into the next column.
    steps, carry = [], 0
    for da in _digits(a, len(str(a))):
        total = da * digit + carry
        step = f"{da}*{digit}" + (f"+{carry}" if carry else "") + f"={total}"
        carry = total // 10
        steps.append(step + (f" carry {carry}" if carry else ""))
    return steps


def make_problem(kind: str, a: int, b: int, show_steps: bool = True) -> Problem:
    """One problem: kind "add" (a+b), "sub" (a-b, needs a >= b) or "mul" (a*b, b a single digit)."""
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    if kind == "add":
        symbol, answer, steps = "+", a + b, _add_steps(a, b)
    elif kind == "sub":
        if a < b:
            raise ValueError(f"sub needs a >= b so the answer is not negative, got {a}-{b}")
        symbol, answer, steps = "-", a - b, _sub_steps(a, b)
    elif kind == "mul":
        if not 0 <= b <= 9:
            raise ValueError(f"mul multiplies by a single digit, got b = {b}")
        symbol, answer, steps = "*", a * b, _mul_steps(a, b)
    else:
        raise ValueError(f"unknown arithmetic kind {kind!r}; choose from {ARITHMETIC_KINDS}")
    work = ("; ".join(steps) + f"; so {answer}") if show_steps else str(answer)
    return Problem(prompt=f"Q: {a}{symbol}{b}=? A:", completion=f" {work}\n", answer=answer)


def arithmetic_problems(n: int, seed: int = 0, kinds: Sequence[str] = ARITHMETIC_KINDS, max_digits: int = 3,
                        show_steps: bool = True) -> list[Problem]:
    """n problems drawn from random.Random(seed): the same arguments always give the same list.
    Operands have 1..max_digits digits (each length equally likely, so short sums are not drowned out)."""
    if n < 0 or max_digits < 1:
        raise ValueError(f"need n >= 0 and max_digits >= 1, got n = {n}, max_digits = {max_digits}")
    unknown = set(kinds) - set(ARITHMETIC_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds = {kinds!r}: choose a non-empty subset of {ARITHMETIC_KINDS}")
    rng = random.Random(seed)

    def number() -> int:
        n_digits = rng.randint(1, max_digits)
        return rng.randint(0 if n_digits == 1 else 10 ** (n_digits - 1), 10**n_digits - 1)

    problems = []
    for _ in range(n):
        kind = rng.choice(list(kinds))
        if kind == "mul":
            a, b = number(), rng.randint(0, 9)
        else:
            a, b = number(), number()
            if kind == "sub" and a < b:
                a, b = b, a
        problems.append(make_problem(kind, a, b, show_steps=show_steps))
    return problems


def arithmetic_text(n: int, seed: int = 0, **kwargs) -> str:
    """n problems as one training text, one problem per line (keyword arguments as arithmetic_problems)."""
    return "".join(p.text for p in arithmetic_problems(n, seed, **kwargs))


_LAST_NUMBER = re.compile(r"(-?\d+)\s*$")


def extract_answer(completion: str) -> int | None:
    """The final answer in a completion: the last number on its first line ("...; so 85" -> 85), else None."""
    first_line = completion.lstrip().split("\n", 1)[0]
    match = _LAST_NUMBER.search(first_line)
    return int(match.group(1)) if match else None


def check_answer(completion: str, answer: int) -> bool:
    """True when the completion ends its first line with the right answer: a rule-based reward."""
    return extract_answer(completion) == answer


# ----------------------------------------------------------------------------------------------------------------
# Text already on this machine

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
# Inside the standard library: installed third-party packages, bytecode, and the test suites (which hold files in
# deliberately broken encodings) are not "the standard library's own sources".
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def _read_texts(files: Sequence[Path], max_bytes: int | None) -> str:
    """Concatenate files as UTF-8 (invalid bytes become U+FFFD), stopping once max_bytes have been gathered."""
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes().decode("utf-8", errors="replace").encode("utf-8")
        if not data.endswith(b"\n"):
            data += b"\n"
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    # Cutting at max_bytes may split a character; errors="ignore" drops that partial tail only.
    joined = b"".join(chunks)
    return (joined if max_bytes is None else joined[:max_bytes]).decode("utf-8", errors="ignore")


def _walk(root: Path, suffixes: Sequence[str], skip_dirs: Collection[str] = ()) -> list[Path]:
    """Files under root with one of the suffixes, in sorted path order (so every run sees the same text)."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)  # prune in place: os.walk won't descend
        found += [Path(folder, f) for f in filenames if f.endswith(tuple(suffixes))]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_bytes: int | None = 2_000_000, include_docs: bool = True) -> str:
    """Text of the Python standard library installed on this machine: its *.py sources and, with include_docs,
    the *.txt/*.rst files that ship beside them (pydoc_data/topics.py already carries the language reference).
    Sorted path order; stops after max_bytes bytes of UTF-8 (None: all of it, about 12 MB)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    suffixes = (".py", ".txt", ".rst") if include_docs else (".py",)
    files = _walk(root, suffixes, skip_dirs=_STDLIB_SKIP_DIRS)
    if not files:
        raise ValueError(f"no Python sources found under the standard library folder {root}")
    return _read_texts(files, max_bytes)


def text_files_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike],
                      suffixes: Sequence[str] = TEXT_SUFFIXES, max_bytes: int | None = None) -> str:
    """Your own text: files are read as given; folders are searched recursively for files ending in one of
    the suffixes. Everything is concatenated in the order given (folders in sorted path order)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += _walk(path, suffixes)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text_files_corpus: {path} does not exist")
    text = _read_texts(files, max_bytes)
    if not text.strip():
        raise ValueError(f"text_files_corpus: no text found in {[str(p) for p in paths]} "
                         f"(folders are searched for files ending in {tuple(suffixes)})")
    return text


def prose_corpus(max_bytes: int | None = 1_000_000) -> str:
    """English prose already on this machine: the Python documentation topics that pydoc shows (the language
    reference, about 750 KB, shipped as strings in pydoc_data/topics.py), then the standard library's *.txt files
    (licence, IDLE's news and help). Stops after max_bytes bytes of UTF-8 (None: all of it)."""
    from pydoc_data.topics import topics

    documentation = "".join(topics[name].rstrip() + "\n\n" for name in sorted(topics))
    if max_bytes is not None and len(documentation.encode("utf-8")) >= max_bytes:
        return documentation.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    root = Path(sysconfig.get_paths()["stdlib"])
    rest = None if max_bytes is None else max_bytes - len(documentation.encode("utf-8"))
    return documentation + _read_texts(_walk(root, (".txt",), skip_dirs=_STDLIB_SKIP_DIRS), rest)


DOMAINS = ("code", "arithmetic", "prose")


def mixed_corpus(bytes_per_domain: int = 300_000, chunk_bytes: int = 2048, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens of three kinds of text, cut into chunks of about chunk_bytes (at line ends) and shuffled
    together, with the domain of every token: (tokens [n] int64, domains [n] int64 indexing DOMAINS).

    code: the standard library's *.py sources; arithmetic: worked problems (arithmetic_text); prose: the
    Python documentation (prose_corpus). Each domain gives about bytes_per_domain bytes. The order of the chunks
    is drawn from random.Random(seed), so the train and val splits of a TokenDataset(tokens) both hold all three.
    """
    if bytes_per_domain < chunk_bytes or chunk_bytes < 1:
        raise ValueError(f"need 1 <= chunk_bytes <= bytes_per_domain, got {chunk_bytes} and {bytes_per_domain}")
    n_problems = bytes_per_domain // 20  # a problem with its worked steps is 25-60 bytes: more than enough
    sources = {"code": stdlib_corpus(bytes_per_domain, include_docs=False),
               "arithmetic": arithmetic_text(n_problems, seed=seed), "prose": prose_corpus(bytes_per_domain)}
    chunks: list[tuple[int, bytes]] = []
    for domain, text in sources.items():
        data = text.encode("utf-8")[:bytes_per_domain]
        start = 0
        while start < len(data):
            cut = data.find(b"\n", start + chunk_bytes)  # end chunks at a line end: never inside a character
            end = len(data) if cut < 0 else cut + 1
            chunks.append((DOMAINS.index(domain), data[start:end]))
            start = end
    random.Random(seed).shuffle(chunks)
    tokens = torch.tensor(list(b"".join(data for _, data in chunks)), dtype=torch.long)
    domains = torch.cat([torch.full((len(data),), domain, dtype=torch.long) for domain, data in chunks])
    return tokens, domains


# ----------------------------------------------------------------------------------------------------------------
# Token batches

SPLITS = ("train", "val")


def _batch_seed(seed: int, split: str, step: int) -> int:
    # Hash rather than add: seed + step would make (seed 0, step 1) and (seed 1, step 0) draw the same batch.
    digest = hashlib.sha256(f"{seed}/{split}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class TokenDataset:
    """A 1-D token stream cut into a train part and a held-out val part (the last val_fraction of it).

    Batches are random windows of the stream, drawn from a generator seeded by (seed, split, step): asking for
    step 1234 gives the same batch in any process, in any order, which is what makes resuming exact.
    """

    def __init__(self, tokens: torch.Tensor | Sequence[int], val_fraction: float = 0.1, seed: int = 0):
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"TokenDataset needs a non-empty 1-D token stream, got shape {tuple(tokens.shape)}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction = {val_fraction}: must be in [0, 1)")
        n_val = int(tokens.numel() * val_fraction)
        self.seed = seed
        self.splits = {"train": tokens[:tokens.numel() - n_val], "val": tokens[tokens.numel() - n_val:]}

    @classmethod
    def from_text(cls, text: str, tokenizer: ByteTokenizer | None = None, val_fraction: float = 0.1,
                  seed: int = 0) -> TokenDataset:
        """Tokenize text (with the byte tokenizer unless given another) into a dataset."""
        if not text:
            raise ValueError("TokenDataset.from_text: the text is empty")
        return cls((tokenizer or ByteTokenizer()).encode(text), val_fraction=val_fraction, seed=seed)

    def __len__(self) -> int:
        return sum(t.numel() for t in self.splits.values())

    def get_batch(self, step: int, batch_size: int, seq_len: int, split: str = "train"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each LongTensor [batch_size, seq_len]; a pure function of
        (seed, split, step, batch_size, seq_len)."""
        if split not in SPLITS:
            raise ValueError(f"split = {split!r}: must be one of {SPLITS}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        tokens = self.splits[split]
        # A window needs seq_len inputs plus one more token for the last target.
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"the {split} split has {tokens.numel()} tokens, too few for seq_len = {seq_len} "
                             f"(needs at least {seq_len + 1}); use more text, a shorter seq_len, or another "
                             f"val_fraction")
        generator = torch.Generator().manual_seed(_batch_seed(self.seed, split, step))
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)  # [B]
        window = starts[:, None] + torch.arange(seq_len + 1)  # [B, T+1]
        chunk = tokens[window]  # [B, T+1]
        return chunk[:, :-1], chunk[:, 1:]
