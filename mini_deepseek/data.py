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


# ----------------------------------------------------------------------------------------------------------------
# Numbers in two "languages": digits ("17") and words ("seventeen")
#
# Chapter 06 needs a second language so that a model can mix languages in its reasoning, as DeepSeek-R1-Zero mixed
# English and Chinese, and be rewarded for keeping to one. Numerals are where the two differ here; the operators
# (+ - =) and the separators are shared, like punctuation.

NUMBER_LANGUAGES = ("digits", "words")
_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
MAX_WORD_NUMBER = 99  # number words are defined for 0..99, the range of the word problems
# One numeral in either language: a run of digits, or a number word ("seven", "seventeen", "thirty seven").
# Compound numbers are written with a space, not the usual hyphen, because "-" is the minus sign of the worked
# solutions ("twenty-two" would read as 20 - 2). Longer words first, so "seventeen" is not read as "seven"; \b
# keeps "someone" from holding a "one".
_WORD_NUMERAL = (r"(?:" + "|".join(_TENS) + r")(?: (?:" + "|".join(_UNITS[1:10]) + r"))?|"
                 + "|".join(sorted(_UNITS, key=len, reverse=True)))
NUMERAL = re.compile(r"\b(\d+|" + _WORD_NUMERAL + r")\b")
_LAST_NUMERAL = re.compile(r"(-?\d+|\b(?:" + _WORD_NUMERAL + r"))\s*$")


def number_to_words(n: int) -> str:
    """0..99 in English words: 7 -> "seven", 37 -> "thirty seven" (a space, not a hyphen: see NUMERAL)."""
    if not 0 <= n <= MAX_WORD_NUMBER:
        raise ValueError(f"number words are defined for 0..{MAX_WORD_NUMBER}, got {n}")
    if n < 20:
        return _UNITS[n]
    tens, units = divmod(n, 10)
    return _TENS[tens - 2] + (f" {_UNITS[units]}" if units else "")


_WORD_VALUES = {number_to_words(n): n for n in range(MAX_WORD_NUMBER + 1)}


def write_number(n: int, language: str) -> str:
    """n in the given language: write_number(17, "digits") == "17", write_number(17, "words") == "seventeen"."""
    if language == "digits":
        return str(n)
    if language == "words":
        return number_to_words(n)
    raise ValueError(f"unknown number language {language!r}; choose one of {NUMBER_LANGUAGES}")


def parse_number(text: str) -> int | None:
    """A whole text as one numeral in either language ("85", " eighty five ", "-3"), else None."""
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return _WORD_VALUES.get(text.lower())


def numeral_language(numeral: str) -> str:
    """"digits" or "words": the language of one numeral as NUMERAL finds them."""
    return "digits" if numeral[:1].isdigit() or numeral[:1] == "-" else "words"


def extract_answer(completion: str) -> int | None:
    """The final answer in a completion: the last number on its first line ("...; so 85" -> 85), else None.
    The number may be written in either language of chapter 06 ("...; so eighty five" -> 85)."""
    first_line = completion.lstrip().split("\n", 1)[0]
    match = _LAST_NUMERAL.search(first_line)
    return parse_number(match.group(1)) if match else None


def check_answer(completion: str, answer: int) -> bool:
    """True when the completion ends its first line with the right answer: a rule-based reward."""
    return extract_answer(completion) == answer


# ----------------------------------------------------------------------------------------------------------------
# Multi-step word problems of graded difficulty (chapter 06: GRPO and the R1 recipe)
#
#   Q: Ann has 7 pens, gets 5, loses 3. How many? A: 7+5=12; 12-3=9; so 9
#
# The level is the number of operations (1 = one step). A problem can be asked in either number language, and its
# worked solution can be written three ways, which is what the chapter's experiments turn on:
# - step by step ("7+5=12; 12-3=9") or all at once ("7+5-3=9"): the second is shorter and, for a small model,
#   more often wrong on long problems;
# - in the question's language, or switching language partway ("seven+five=12; 12-3=9"), as text on the web does.

WORD_PROBLEM_NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Gus", "Ivy", "Jay", "Kim", "Leo", "Mia", "Ned")
WORD_PROBLEM_ITEMS = ("pens", "cards", "coins", "books", "shells", "stamps", "apples", "marbles", "beads", "cups")
_GAIN_VERBS = ("gets", "finds", "buys", "wins")
_LOSS_VERBS = ("loses", "sells", "gives away", "uses")
WORD_PROBLEM_MAX = 20  # default bound of every count in a story (0..20); at most MAX_WORD_NUMBER


@dataclass(frozen=True)
class WordProblem(Problem):
    level: int = 1  # number of operations: 1 (one step) .. the hardest level asked for
    language: str = "digits"  # the language of the question's numbers, which the reasoning should keep
    reasoning: str = ""  # the worked solution without the answer: "7+5=12; 12-3=9"
    answer_text: str = ""  # the answer as the solution writes it: "9" or "nine"
    expression: str = ""  # the arithmetic behind the story, "7+5-3": held-out problems are kept out of training by it

    @property
    def r1_completion(self) -> str:
        """The same solution in DeepSeek-R1's format: "<think>7+5=12; 12-3=9; so 9</think><answer>9</answer>".
        Only the delimiters differ from the pretraining text's " 7+5=12; 12-3=9; so 9"."""
        return f"<think>{self.reasoning}; so {self.answer_text}</think><answer>{self.answer_text}</answer>"


def make_word_problem(start: int, steps: Sequence[tuple[str, int]], language: str = "digits", name: str = "Ann",
                      item: str = "pens", verbs: Sequence[str] | None = None, all_at_once: bool = False,
                      switch_at: int | None = None, max_count: int = WORD_PROBLEM_MAX) -> WordProblem:
    """One story: `start` items, then each (op, n) of steps, op "+" or "-". Every count must stay in
    0..max_count. verbs: one verb per step (default: the first gain or loss verb).

    all_at_once: the solution writes the whole expression and its value ("7+5-3=9") instead of one step at a time.
    switch_at: the solution switches to the other number language from its numeral number switch_at on (0 is the
    first numeral; the question itself is never switched).
    """
    if language not in NUMBER_LANGUAGES:
        raise ValueError(f"unknown number language {language!r}; choose one of {NUMBER_LANGUAGES}")
    if not steps:
        raise ValueError("a word problem needs at least one step")
    values, total = [start], start
    for op, n in steps:
        if op not in "+-" or len(op) != 1 or n < 1:
            raise ValueError(f"a step is ('+' or '-', a positive number), got {(op, n)}")
        total = total + n if op == "+" else total - n
        values.append(total)
    if not 0 < max_count <= MAX_WORD_NUMBER:
        raise ValueError(f"max_count = {max_count}: must be in 1..{MAX_WORD_NUMBER} (numbers must have words)")
    if not all(0 <= v <= max_count for v in [start, *values, *(n for _, n in steps)]):
        raise ValueError(f"every count must stay within 0..{max_count}: start {start}, steps {list(steps)}")
    verbs = verbs or [_GAIN_VERBS[0] if op == "+" else _LOSS_VERBS[0] for op, _ in steps]
    if len(verbs) != len(steps):
        raise ValueError(f"{len(verbs)} verbs for {len(steps)} steps")

    question = ", ".join([f"{name} has {write_number(start, language)} {item}"]
                         + [f"{verb} {write_number(n, language)}" for verb, (_, n) in zip(verbs, steps, strict=True)])
    # The solution's numerals in order, each with where it goes; the language switches at numeral switch_at.
    if all_at_once:
        numerals = [start] + [n for _, n in steps] + [total]
    else:
        numerals = [x for (_, n), before, after in zip(steps, values, values[1:], strict=False) for x in (before, n, after)]
    numerals.append(total)  # the answer
    other = NUMBER_LANGUAGES[1 - NUMBER_LANGUAGES.index(language)]
    written = [write_number(v, other if switch_at is not None and i >= switch_at else language)
               for i, v in enumerate(numerals)]
    if all_at_once:
        expression = written[0] + "".join(op + w for (op, _), w in zip(steps, written[1:], strict=False))
        reasoning = f"{expression}={written[len(steps) + 1]}"
    else:
        reasoning = "; ".join(f"{written[3 * i]}{op}{written[3 * i + 1]}={written[3 * i + 2]}"
                              for i, (op, _) in enumerate(steps))
    answer_text = written[-1]
    return WordProblem(prompt=f"Q: {question}. How many? A:", completion=f" {reasoning}; so {answer_text}\n",
                       answer=total, level=len(steps), language=language, reasoning=reasoning,
                       answer_text=answer_text, expression=str(start) + "".join(f"{op}{n}" for op, n in steps))


def word_problems(n: int, seed: int = 0, levels: Sequence[int] = (1, 2, 3), words_share: float = 0.3,
                  all_at_once_share: float = 0.0, switch_share: float = 0.0,
                  exclude: Collection[str] = (), max_count: int = WORD_PROBLEM_MAX) -> list[WordProblem]:
    """n word problems from random.Random(seed), the level drawn uniformly from levels.

    words_share: share of questions asked in number words. all_at_once_share: share of multi-step problems solved
    all at once. switch_share: share of solutions that switch number language partway (at a random numeral).
    exclude: expressions ("7+5-3") never to produce, e.g. those of a held-out set. max_count: every count stays
    within 0..max_count (the start is drawn from 2..max_count, each step adds or removes 1..min(9, max_count)).
    """
    if n < 0 or not levels or min(levels) < 1:
        raise ValueError(f"need n >= 0 and levels >= 1, got n = {n}, levels = {levels}")
    for name, share in (("words_share", words_share), ("all_at_once_share", all_at_once_share),
                        ("switch_share", switch_share)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} = {share}: must be in [0, 1]")
    rng, problems, excluded = random.Random(seed), [], set(exclude)
    for _ in range(1000 * n + 1000):  # draws, including those excluded
        if len(problems) == n:
            break
        level = rng.choice(list(levels))
        start = total = rng.randint(2, max_count)
        steps = []
        for _ in range(level):
            # Gain or lose 1..9 (no more than one of the two directions allows), keeping the count in 0..max_count.
            amount = rng.randint(1, min(9, max(total, max_count - total)))
            op = rng.choice("+-")
            if (op == "+" and total + amount > max_count) or (op == "-" and total - amount < 0):
                op = "-" if op == "+" else "+"
            total += amount if op == "+" else -amount
            steps.append((op, amount))
        language = "words" if rng.random() < words_share else "digits"
        all_at_once = level > 1 and rng.random() < all_at_once_share
        n_numerals = level + 2 if all_at_once else 3 * level + 1
        switch_at = rng.randint(1, n_numerals - 1) if rng.random() < switch_share else None
        verbs = [rng.choice(_GAIN_VERBS if op == "+" else _LOSS_VERBS) for op, _ in steps]
        problem = make_word_problem(start, steps, language, name=rng.choice(WORD_PROBLEM_NAMES),
                                    item=rng.choice(WORD_PROBLEM_ITEMS), verbs=verbs, all_at_once=all_at_once,
                                    switch_at=switch_at, max_count=max_count)
        if problem.expression not in excluded:
            problems.append(problem)
    else:
        raise ValueError(f"could not draw {n} problems at levels {tuple(levels)} outside the {len(excluded)} "
                         f"excluded expressions")
    return problems


def arithmetic_tables(max_count: int = WORD_PROBLEM_MAX, languages: Sequence[str] = NUMBER_LANGUAGES
                      ) -> list[tuple[str, str]]:
    """Every single step a word problem with counts in 0..max_count can take, as (prompt, completion) pairs in each
    language: ("7+5=", "12"), ("seven+five=", "twelve"), ... A pretraining text has such tables beside its word
    problems; they teach the facts that a worked solution strings together."""
    if not 0 < max_count <= MAX_WORD_NUMBER:
        raise ValueError(f"max_count = {max_count}: must be in 1..{MAX_WORD_NUMBER}")
    pairs = []
    for language in languages:
        for a in range(max_count + 1):
            for b in range(1, min(9, max_count) + 1):
                for op, result in (("+", a + b), ("-", a - b)):
                    if 0 <= result <= max_count:
                        pairs.append((write_number(a, language) + op + write_number(b, language) + "=",
                                      write_number(result, language)))
    return pairs


def word_problem_pretraining(problems: Sequence[WordProblem], tokenizer: ByteTokenizer, max_count: int = WORD_PROBLEM_MAX,
                             r1_share: float = 0.0, seed: int = 0, tables_batch_scale: int = 4) -> InterleavedDataset:
    """A base model's pretraining data for chapter 06: the worked problems as (question, solution) pairs, taking
    turns with the arithmetic tables of both number languages, whose batches are tables_batch_scale times larger
    (a fact is a few tokens, and a small model needs many of them before it uses the facts inside a solution).
    r1_share: the share of solutions written in R1's tagged format instead of the plain one (random.Random(seed)
    picks them), as a crawl holds a little text in any format; the tags are then tokens the base model has seen."""
    if not 0 <= r1_share <= 1:
        raise ValueError(f"r1_share = {r1_share}: must be in [0, 1]")
    rng = random.Random(seed)
    pairs = [(p.prompt, p.r1_completion if rng.random() < r1_share else p.completion.rstrip("\n")) for p in problems]
    return InterleavedDataset(PairDataset(pairs, tokenizer, seed=seed),
                              PairDataset(arithmetic_tables(max_count), tokenizer, seed=seed),
                              batch_scale=(1, tables_batch_scale))


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


class PairDataset:
    """(prompt, completion) pairs for supervised fine-tuning, with the get_batch interface of TokenDataset, so
    train() runs SFT as it runs pretraining.

    Each example is prompt + completion + <|eos|>. Its targets are the next tokens with the prompt's masked to
    -100: the model learns to write the completion (and to stop), not to predict the question. Batches are right
    padded (inputs with <|pad|>, targets with -100) to the longest example in them, and are a pure function of
    (seed, split, step), as TokenDataset's.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer: ByteTokenizer | None = None,
                 val_fraction: float = 0.0, seed: int = 0):
        tokenizer = tokenizer or ByteTokenizer()
        if not pairs:
            raise ValueError("PairDataset needs at least one (prompt, completion) pair")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction = {val_fraction}: must be in [0, 1)")
        self.pad_id, self.seed = tokenizer.pad_id, seed
        examples = []
        for i, (prompt, completion) in enumerate(pairs):
            prompt_ids = tokenizer.encode(prompt)
            if not prompt_ids:
                raise ValueError(f"pair {i}: the prompt is empty (the first completion token needs a prompt before it)")
            ids = prompt_ids + tokenizer.encode(completion, eos=True)
            targets = ids[1:]
            targets[:len(prompt_ids) - 1] = [-100] * (len(prompt_ids) - 1)  # predicting the prompt is not the task
            examples.append((ids[:-1], targets))
        n_val = int(len(examples) * val_fraction)
        self.splits = {"train": examples[:len(examples) - n_val], "val": examples[len(examples) - n_val:]}
        self.max_len = max(len(inputs) for inputs, _ in examples)  # the longest example: a seq_len that fits all

    def __len__(self) -> int:
        return sum(len(examples) for examples in self.splits.values())

    def get_batch(self, step: int, batch_size: int, seq_len: int, split: str = "train"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, LongTensor [batch_size, T] each, T the longest chosen example (<= seq_len)."""
        if split not in SPLITS:
            raise ValueError(f"split = {split!r}: must be one of {SPLITS}")
        examples = self.splits[split]
        if not examples:
            raise ValueError(f"the {split} split of this PairDataset is empty (val_fraction too small?)")
        generator = torch.Generator().manual_seed(_batch_seed(self.seed, split, step))
        chosen = [examples[i] for i in torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()]
        width = max(len(inputs) for inputs, _ in chosen)
        if width > seq_len:
            raise ValueError(f"an example of {width} tokens (prompt + completion + eos - 1) does not fit seq_len = "
                             f"{seq_len}; use seq_len >= dataset.max_len = {self.max_len}, or shorter examples")
        inputs = torch.full((batch_size, width), self.pad_id, dtype=torch.long)
        targets = torch.full((batch_size, width), -100, dtype=torch.long)
        for b, (x, y) in enumerate(chosen):
            inputs[b, :len(x)] = torch.tensor(x)
            targets[b, :len(y)] = torch.tensor(y)
        return inputs, targets


class InterleavedDataset:
    """Datasets taking turns, one batch each (step s draws batch s // n of dataset s % n), with the get_batch
    interface of TokenDataset: e.g. worked problems and arithmetic tables in one pretraining run. batch_scale: one
    factor per dataset, its batches hold batch_size x factor examples (short examples can come in larger batches)."""

    def __init__(self, *datasets: TokenDataset | PairDataset, batch_scale: Sequence[int] | None = None):
        if not datasets:
            raise ValueError("InterleavedDataset needs at least one dataset")
        batch_scale = tuple(batch_scale) if batch_scale is not None else (1,) * len(datasets)
        if len(batch_scale) != len(datasets) or min(batch_scale) < 1:
            raise ValueError(f"batch_scale = {batch_scale}: one factor >= 1 per dataset ({len(datasets)})")
        self.datasets, self.batch_scale = datasets, batch_scale

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def get_batch(self, step: int, batch_size: int, seq_len: int, split: str = "train"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.datasets)
        return self.datasets[step % n].get_batch(step // n, batch_size * self.batch_scale[step % n], seq_len, split)
