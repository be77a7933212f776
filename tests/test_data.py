import sysconfig

import pytest
import torch

from mini_deepseek.data import (
    DOMAINS,
    NUMERAL,
    InterleavedDataset,
    PairDataset,
    TokenDataset,
    arithmetic_problems,
    arithmetic_tables,
    arithmetic_text,
    check_answer,
    extract_answer,
    make_problem,
    make_word_problem,
    mixed_corpus,
    number_to_words,
    parse_number,
    prose_corpus,
    stdlib_corpus,
    text_files_corpus,
    word_problem_pretraining,
    word_problems,
    write_number,
)
from mini_deepseek.tokenizer import TagTokenizer


@pytest.mark.parametrize("kind, a, b, text", [
    ("add", 37, 48, "Q: 37+48=? A: 7+8=15 carry 1; 3+4+1=8; so 85\n"),
    ("add", 95, 17, "Q: 95+17=? A: 5+7=12 carry 1; 9+1+1=11 carry 1; so 112\n"),
    ("add", 123, 9, "Q: 123+9=? A: 3+9=12 carry 1; 2+0+1=3; 1+0=1; so 132\n"),
    ("sub", 52, 17, "Q: 52-17=? A: 12-7=5 borrow 1; 5-1-1=3; so 35\n"),
    ("sub", 100, 99, "Q: 100-99=? A: 10-9=1 borrow 1; 10-9-1=0 borrow 1; 1-0-1=0; so 1\n"),
    ("mul", 347, 6, "Q: 347*6=? A: 7*6=42 carry 4; 4*6+4=28 carry 2; 3*6+2=20 carry 2; so 2082\n"),
])
def test_worked_steps(kind, a, b, text):
    problem = make_problem(kind, a, b)
    assert problem.text == text
    assert problem.prompt == text[:text.index("A:") + 2]
    assert check_answer(problem.completion, problem.answer)


def test_every_generated_problem_is_right():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    problems = arithmetic_problems(600, seed=3, max_digits=4)
    seen_ops = set()
    for p in problems:
        expression = p.prompt[len("Q: "):p.prompt.index("=")]
        op = next(c for c in "+-*" if c in expression)
        seen_ops.add(op)
        a, b = map(int, expression.split(op))
        assert p.answer == ops[op](a, b) >= 0
        assert extract_answer(p.completion) == p.answer
        # The worked steps end in the answer's last digit: the units column is computed first.
        assert int(p.completion.split(";")[0].split("=")[1].split()[0]) % 10 == p.answer % 10
    assert seen_ops == set("+-*")


def test_generation_is_seeded():
    assert arithmetic_text(50, seed=1) == arithmetic_text(50, seed=1)
    assert arithmetic_text(50, seed=1) != arithmetic_text(50, seed=2)
    only_mul = arithmetic_problems(20, seed=0, kinds=["mul"], max_digits=2)
    assert all("*" in p.prompt and p.answer < 100 * 10 for p in only_mul)
    plain = arithmetic_problems(5, seed=0, show_steps=False)
    assert all(p.completion == f" {p.answer}\n" for p in plain)


def test_answer_checking():
    assert extract_answer(" 7+8=15 carry 1; 3+4+1=8; so 85\nQ: 1+1=? A: so 2") == 85
    assert extract_answer(" 85 ") == 85
    assert extract_answer(" no idea") is None
    assert not check_answer(" so 84", 85)
    assert not check_answer("", 85)


@pytest.mark.parametrize("args, match", [
    (("div", 4, 2), "unknown arithmetic kind"),
    (("sub", 3, 5), "a >= b"),
    (("mul", 3, 12), "single digit"),
    (("add", -3, 5), "non-negative"),
])
def test_bad_problems(args, match):
    with pytest.raises(ValueError, match=match):
        make_problem(*args)
    with pytest.raises(ValueError, match="kinds"):
        arithmetic_problems(3, kinds=["pow"])


def test_stdlib_corpus_reads_this_machines_standard_library():
    text = stdlib_corpus(max_bytes=300_000)
    assert 299_000 <= len(text.encode("utf-8")) <= 300_000
    assert text == stdlib_corpus(max_bytes=300_000)
    assert "def " in text and "import " in text
    assert "\ufffd" not in stdlib_corpus(max_bytes=100_000, include_docs=False)


def _make_tree(root, files):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)


def test_stdlib_corpus_order_and_what_it_skips(tmp_path, monkeypatch):
    _make_tree(tmp_path, {"b.py": "B = 2\n", "a.py": "A = 1", "pkg/c.py": "C = 3\n", "NOTES.txt": "notes\n",
                          "test/test_a.py": "skipped\n", "site-packages/lib.py": "skipped\n",
                          "__pycache__/a.py": "skipped\n", "data.bin": b"\xff\x00"})
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert stdlib_corpus(max_bytes=None) == "notes\nA = 1\nB = 2\nC = 3\n"
    assert stdlib_corpus(max_bytes=None, include_docs=False) == "A = 1\nB = 2\nC = 3\n"
    assert stdlib_corpus(max_bytes=9) == "notes\nA ="
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "pkg" / "none")})
    with pytest.raises(ValueError, match="no Python sources"):
        stdlib_corpus()


def test_text_files_corpus(tmp_path):
    _make_tree(tmp_path, {"notes/b.md": "second\n", "notes/a.txt": "first\n", "notes/skip.bin": "binary\n",
                          "one.csv": "x,y\n", "euro.txt": "€€", "empty.txt": " \n"})
    assert text_files_corpus(tmp_path / "notes") == "first\nsecond\n"
    assert text_files_corpus([tmp_path / "one.csv", str(tmp_path / "notes")]) == "x,y\nfirst\nsecond\n"
    assert text_files_corpus(tmp_path / "notes", suffixes=[".bin"]) == "binary\n"
    assert text_files_corpus(tmp_path / "euro.txt", max_bytes=4) == "€"  # never half a character
    with pytest.raises(FileNotFoundError):
        text_files_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no text"):
        text_files_corpus(tmp_path / "empty.txt")


def test_batches_are_windows_of_their_own_split():
    dataset = TokenDataset(torch.arange(1000), val_fraction=0.2, seed=0)
    assert dataset.splits["train"].numel() == 800 and len(dataset) == 1000
    x, y = dataset.get_batch(5, batch_size=6, seq_len=16)
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.long
    # With tokens = positions, a window is consecutive numbers and the targets are the inputs shifted by one.
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(6, 15, dtype=torch.long))
    assert int(y.max()) < 800
    xv, yv = dataset.get_batch(5, batch_size=6, seq_len=16, split="val")
    assert int(xv.min()) >= 800 and int(yv.max()) < 1000


def test_batches_are_a_pure_function_of_seed_split_and_step():
    tokens = torch.randint(0, 264, (5000,), generator=torch.Generator().manual_seed(0))
    a, b = TokenDataset(tokens, seed=7), TokenDataset(tokens.clone(), seed=7)
    later = a.get_batch(9, 4, 32)
    a.get_batch(3, 4, 32)  # asking for other steps first changes nothing
    assert all(torch.equal(u, v) for u, v in zip(later, b.get_batch(9, 4, 32), strict=True))
    assert not torch.equal(a.get_batch(1, 4, 32)[0], a.get_batch(2, 4, 32)[0])
    assert not torch.equal(TokenDataset(tokens, seed=0).get_batch(1, 4, 32)[0],
                           TokenDataset(tokens, seed=1).get_batch(0, 4, 32)[0])


def test_dataset_errors():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        TokenDataset([])
    with pytest.raises(ValueError, match="empty"):
        TokenDataset.from_text("")
    dataset = TokenDataset.from_text("x" * 100, val_fraction=0.1)
    with pytest.raises(ValueError, match="too few for seq_len = 10"):
        dataset.get_batch(0, 2, 10, split="val")
    with pytest.raises(ValueError, match="split"):
        dataset.get_batch(0, 2, 4, split="test")
    with pytest.raises(ValueError, match="val_fraction"):
        TokenDataset(torch.arange(10), val_fraction=1.0)


# --- word problems in two number languages (chapter 06) ------------------------------------------------------------
@pytest.mark.parametrize("n, words", [(0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"),
                                      (37, "thirty seven"), (99, "ninety nine")])
def test_number_words(n, words):
    assert number_to_words(n) == write_number(n, "words") == words
    assert parse_number(words) == parse_number(f" {words.upper()} ") == parse_number(str(n)) == n
    assert NUMERAL.findall(f"{words}+{n}={words}") == [words, str(n), words]


def test_every_number_word_reads_back_and_bad_numbers_are_refused():
    assert [parse_number(number_to_words(n)) for n in range(100)] == list(range(100))
    assert parse_number("seven pens") is None and parse_number("") is None and parse_number("twenty-one") is None
    with pytest.raises(ValueError, match="0..99"):
        number_to_words(100)
    with pytest.raises(ValueError, match="unknown number language"):
        write_number(3, "roman")


def test_extract_answer_reads_number_words():
    assert extract_answer(" nine-two=seven; so seven\nQ: ...") == 7
    assert extract_answer(" 8+9=17; so seventeen") == 17
    assert check_answer(" so twenty one", 21) and not check_answer(" so twenty one", 20)


@pytest.mark.parametrize("kwargs, text", [
    (dict(), "Q: Ann has 7 pens, gets 5, loses 3. How many? A: 7+5=12; 12-3=9; so 9\n"),
    (dict(all_at_once=True), "Q: Ann has 7 pens, gets 5, loses 3. How many? A: 7+5-3=9; so 9\n"),
    (dict(language="words"),
     "Q: Ann has seven pens, gets five, loses three. How many? A: seven+five=twelve; twelve-three=nine; so nine\n"),
    (dict(language="words", switch_at=2),
     "Q: Ann has seven pens, gets five, loses three. How many? A: seven+five=12; 12-3=9; so 9\n"),
])
def test_word_problem_solutions(kwargs, text):
    problem = make_word_problem(7, [("+", 5), ("-", 3)], **kwargs)
    assert problem.text == text
    assert problem.answer == 9 and problem.level == 2 and problem.expression == "7+5-3"
    assert problem.r1_completion == (f"<think>{problem.reasoning}; so {problem.answer_text}</think>"
                                     f"<answer>{problem.answer_text}</answer>")
    assert check_answer(problem.completion, 9)


@pytest.mark.parametrize("args, match", [
    ((5, [("-", 7)]), "within 0..20"),
    ((15, [("+", 9)]), "within 0..20"),
    ((5, [("*", 2)]), "'\\+' or '-'"),
    ((5, []), "at least one step"),
])
def test_bad_word_problems(args, match):
    with pytest.raises(ValueError, match=match):
        make_word_problem(*args)


def test_generated_word_problems_are_right_seeded_and_keep_out_excluded_expressions():
    problems = word_problems(400, seed=4, levels=(1, 2, 3), words_share=0.4, all_at_once_share=0.5,
                             switch_share=0.3)
    assert problems == word_problems(400, seed=4, levels=(1, 2, 3), words_share=0.4, all_at_once_share=0.5,
                                     switch_share=0.3)
    for p in problems:
        assert p.answer == eval(p.expression) and 0 <= p.answer <= 20  # the expression is digits, + and - only
        assert extract_answer(p.completion) == p.answer and p.level == p.expression.count("+") + p.expression.count("-")
    assert {p.level for p in problems} == {1, 2, 3} and {p.language for p in problems} == {"digits", "words"}
    held_out = {p.expression for p in problems[:100]}
    assert not held_out & {p.expression for p in word_problems(400, seed=5, exclude=held_out)}
    with pytest.raises(ValueError, match="could not draw"):
        word_problems(5, seed=0, levels=(1,), exclude={p.expression for p in word_problems(3000, seed=1, levels=(1,))})


def test_pair_dataset_masks_the_prompt_and_pads():
    tok = TagTokenizer()
    data = PairDataset([("Q: 1+1? A:", "<think>1+1=2</think><answer>2</answer>"), ("Q:", " no")], tok)
    # prompt 10 tokens + completion 10 (4 tags, "1+1=2", "2") + eos, less one: inputs never include the last token
    assert data.max_len == 10 + 10 + 1 - 1
    x, y = data.get_batch(0, 8, seq_len=64)
    assert x.shape == y.shape and x.shape[1] in (data.max_len, 5)
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        n = len([t for t in row_y if t != -100])
        if row_x[3] == ord("1"):  # the long example: the last prompt token predicts the first completion token
            assert row_y[:9] == [-100] * 9 and n == 10 + 1
            assert row_y[9] == tok.tag_ids["<think>"] and row_y[9 + n - 1] == tok.eos_id
        else:  # "Q:" then " no" and eos: one prompt target masked, four to learn, then padding
            assert row_y[:1] == [-100] and n == 4 and row_y[4] == tok.eos_id and row_x[5:] == [tok.pad_id] * 15
    assert torch.equal(data.get_batch(3, 8, 64)[0], data.get_batch(3, 8, 64)[0])
    with pytest.raises(ValueError, match="does not fit seq_len"):
        data.get_batch(0, 8, seq_len=10)
    with pytest.raises(ValueError, match="prompt is empty"):
        PairDataset([("", "x")], tok)
    with pytest.raises(ValueError, match="val split"):
        data.get_batch(0, 2, 64, split="val")


def test_arithmetic_tables_hold_every_step_of_the_word_problems():
    tables = arithmetic_tables(12)
    assert ("7+5=", "12") in tables and ("twelve-three=", "nine") in tables and ("5-7=", "-2") not in tables
    facts = {prompt + answer for prompt, answer in tables}
    assert len(facts) == len(tables)
    for problem in word_problems(300, seed=1, max_count=12, words_share=0.5):
        assert all(step in facts for step in problem.reasoning.split("; ")), problem.reasoning
    with pytest.raises(ValueError, match="max_count"):
        arithmetic_tables(0)


def test_interleaved_dataset_takes_turns():
    first, second = PairDataset([("a", "1")]), PairDataset([("bb", "22")])
    mixed = InterleavedDataset(first, second)
    for step in range(4):
        expected = (first if step % 2 == 0 else second).get_batch(step // 2, 2, 8)
        assert all(torch.equal(x, y) for x, y in zip(mixed.get_batch(step, 2, 8), expected, strict=True))
    assert len(mixed) == 2
    scaled = InterleavedDataset(first, second, batch_scale=(1, 3))
    assert scaled.get_batch(0, 2, 8)[0].shape[0] == 2 and scaled.get_batch(1, 2, 8)[0].shape[0] == 6
    with pytest.raises(ValueError, match="batch_scale"):
        InterleavedDataset(first, second, batch_scale=(1,))


def test_word_problem_pretraining_mixes_formats_and_takes_turns_with_the_tables():
    tok = TagTokenizer()
    problems = word_problems(200, seed=3, max_count=10)
    plain = word_problem_pretraining(problems, tok, max_count=10)
    tagged = word_problem_pretraining(problems, tok, max_count=10, r1_share=1.0)
    some = word_problem_pretraining(problems, tok, max_count=10, r1_share=0.3, seed=1)
    think = tok.tag_ids["<think>"]
    shares = []
    for data in (plain, tagged, some):
        problems_part, tables_part = data.datasets
        assert len(tables_part) == len(arithmetic_tables(10)) and len(problems_part) == len(problems)
        targets = [t for _, t in problems_part.splits["train"]]
        shares.append(sum(think in t for t in targets) / len(targets))
    assert shares[0] == 0.0 and shares[1] == 1.0 and 0.2 < shares[2] < 0.4
    with pytest.raises(ValueError, match="r1_share"):
        word_problem_pretraining(problems, tok, r1_share=1.5)


def test_mixed_corpus_labels_every_token_with_its_domain():
    tokens, domains = mixed_corpus(bytes_per_domain=20_000, chunk_bytes=1000, seed=3)
    assert tokens.shape == domains.shape and tokens.dtype == domains.dtype == torch.long
    assert domains.bincount(minlength=3).tolist() == [20_000, 20_000, 20_000]
    # the tokens labelled with a domain are that domain's source text, chunks shuffled: the same bytes as often
    sources = {"code": stdlib_corpus(20_000, include_docs=False), "arithmetic": arithmetic_text(1000, seed=3),
               "prose": prose_corpus(20_000)}
    for index, name in enumerate(DOMAINS):
        source = torch.tensor(list(sources[name].encode("utf-8")[:20_000]))
        assert torch.equal(tokens[domains == index].bincount(minlength=256), source.bincount(minlength=256)), name
    # chunks end at line ends (except the last of each domain, cut at 20,000 bytes)
    changes = (domains[1:] != domains[:-1]).nonzero().flatten()
    assert len(changes) > 20 and sum(tokens[i] != ord("\n") for i in changes.tolist()) <= len(DOMAINS)
    again, _ = mixed_corpus(bytes_per_domain=20_000, chunk_bytes=1000, seed=3)
    other, _ = mixed_corpus(bytes_per_domain=20_000, chunk_bytes=1000, seed=4)
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)
    with pytest.raises(ValueError, match="chunk_bytes"):
        mixed_corpus(bytes_per_domain=100, chunk_bytes=1000)


def test_prose_corpus_is_the_documentation_text():
    prose = prose_corpus(max_bytes=50_000)
    assert len(prose.encode("utf-8")) <= 50_000 and "def " not in prose[:200]
    assert prose.count(" the ") > 100  # English prose, not code


def test_batches_depend_on_the_dataset_seed():
    # Two datasets that differ only in their seed draw different windows at the same step; the same seed, the same.
    tokens = torch.randint(0, 264, (5000,), generator=torch.Generator().manual_seed(0))
    batches = {seed: TokenDataset(tokens, seed=seed).get_batch(4, 4, 32)[0] for seed in (0, 1, 2)}
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[1], batches[2])
    assert torch.equal(batches[1], TokenDataset(tokens.clone(), seed=1).get_batch(4, 4, 32)[0])
