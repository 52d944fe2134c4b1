"""Prompt loading, the held-out split and the resumable prompt stream."""

import json

import pytest

from drpo_core.errors import ConfigError, DrpoError
from drpo_core.prompts import PromptRecord, PromptStream, load_prompts, split_prompts, subset_prompts

GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "cow", "count": 2}], "exclude": [{"class": "cow", "count": 3}],
     "prompt": "a photo of two cows"},
]
PARTI_TSV = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "bond\tAbstract\tBasic\tBiology-inspired concepts with multiple meanings\n"
    '"G I G G L E" painted on a brick wall\tIllustrations\tWriting & Symbols\t\n'
)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _records(n):
    return [PromptRecord(f"prompt {i}") for i in range(n)]


# -- loading ----------------------------------------------------------------------------------


def test_text_skips_blank_lines_and_comments(tmp_path):
    path = _write(tmp_path / "p.txt", "# a comment\na red cube\n\n   \n  a blue ball  \r\n#another\n")
    assert load_prompts(path) == [PromptRecord("a red cube"), PromptRecord("a blue ball")]


def test_geneval_keeps_whole_row_as_metadata(tmp_path):
    path = _write(tmp_path / "meta.jsonl", "\n".join(json.dumps(row) for row in GENEVAL_ROWS) + "\n\n")
    records = load_prompts(path)
    assert [r.text for r in records] == ["a photo of a bench", "a photo of two cows"]
    assert records[1].metadata == GENEVAL_ROWS[1]


def test_parti_keeps_category_challenge_and_literal_quotes(tmp_path):
    records = load_prompts(_write(tmp_path / "parti.tsv", PARTI_TSV))
    assert records[0] == PromptRecord("bond", {"category": "Abstract", "challenge": "Basic"})
    assert records[1].text == '"G I G G L E" painted on a brick wall'
    assert records[1].metadata == {"category": "Illustrations", "challenge": "Writing & Symbols"}


def test_explicit_format_overrides_suffix(tmp_path):
    path = _write(tmp_path / "prompts.list", "one\ntwo\n")
    assert [r.text for r in load_prompts(path, format="text")] == ["one", "two"]
    with pytest.raises(ConfigError, match="prompts.list: cannot tell the prompt format"):
        load_prompts(path)
    with pytest.raises(ConfigError, match="unknown prompt format 'csv'"):
        load_prompts(path, format="csv")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n', r"bad.jsonl:2: bad JSON"),
        ("nokey.jsonl", '{"prompt": "ok"}\n\n{"tag": "x"}\n', r'nokey.jsonl:3: missing "prompt" key'),
        ("list.jsonl", "[1, 2]\n", r"list.jsonl:1: expected a JSON object"),
        ("empty.txt", "", r"empty.txt: no prompts found"),
        ("comments.txt", "# only\n\n", r"comments.txt: no prompts found"),
        ("header.tsv", "Prompt\tCategory\n", r"header.tsv: no prompts found"),
        ("nohead.tsv", "Text\tCategory\nx\ty\n", r"nohead.tsv:1: header has no 'Prompt' column"),
        ("blank.tsv", "Prompt\tCategory\n\tAbstract\n", r"blank.tsv:2: empty prompt"),
    ],
)
def test_bad_files_give_one_line_naming_file_and_line(tmp_path, name, text, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(DrpoError, match=message) as info:
        load_prompts(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DrpoError, match="prompt file not found: .*nope.txt"):
        load_prompts(tmp_path / "nope.txt")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DrpoError, match="latin.txt: not UTF-8"):
        load_prompts(path)


# -- split ------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    records = _records(50) + [PromptRecord("prompt 3", {"dup": True})]
    train, held_out = split_prompts(records, eval_count=10, seed=7)
    assert split_prompts(records, eval_count=10, seed=7) == (train, held_out)
    assert len({r.text for r in held_out}) == 10
    assert not {r.text for r in train} & {r.text for r in held_out}
    assert len(train) + len(held_out) == len(records)
    assert split_prompts(records, eval_count=10, seed=8)[1] != held_out


def test_split_does_not_depend_on_file_order():
    records = _records(40)
    _, held_out = split_prompts(records, eval_fraction=0.25, seed=1)
    _, held_out_reversed = split_prompts(records[::-1], eval_fraction=0.25, seed=1)
    assert len(held_out) == 10
    assert sorted(r.text for r in held_out) == sorted(r.text for r in held_out_reversed)


def test_split_keeps_input_order_and_allows_zero():
    records = _records(20)
    train, held_out = split_prompts(records, eval_count=5, seed=0)
    assert train == [r for r in records if r in train]
    assert held_out == [r for r in records if r in held_out]
    assert split_prompts(records, eval_count=0, seed=0) == (records, [])


# -- subset of an evaluation file -------------------------------------------------------------


def test_subset_is_seeded_distinct_and_in_file_order():
    records = _records(100) + [PromptRecord("prompt 7", {"dup": True})]
    subset = subset_prompts(records, 10, seed=3)
    assert subset_prompts(records, 10, seed=3) == subset  # deterministic
    assert len({r.text for r in subset}) == 10  # distinct texts; a shared text keeps every record
    assert ("prompt 7" in {r.text for r in subset}) == (len(subset) == 11)
    assert subset == [r for r in records if r in subset]  # file order
    assert subset_prompts(records, 10, seed=4) != subset  # seeded
    assert subset_prompts(records[::-1], 10, seed=3) == subset[::-1]  # by text, not position
    # the held-out side of the split from a prompt file, with the same seed and count
    assert {r.text for r in subset} == {r.text for r in split_prompts(records, eval_count=10, seed=3)[1]}
    # a larger subset keeps every prompt of a smaller one
    assert {r.text for r in subset} <= {r.text for r in subset_prompts(records, 40, seed=3)}


def test_subset_of_all_or_more_is_the_whole_file():
    records = _records(24)
    assert subset_prompts(records, None, seed=0) == records
    assert subset_prompts(records, 24, seed=0) == records
    assert subset_prompts(records, 64, seed=0) == records
    assert subset_prompts(records, 0, seed=0) == []
    with pytest.raises(ConfigError, match="non-negative integer"):
        subset_prompts(records, -1, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"eval_count": 1, "eval_fraction": 0.1}, "exactly one of"),
        ({"eval_count": 5}, "leaves none to train on"),
        ({"eval_count": -1}, "non-negative integer"),
        ({"eval_fraction": 1.0}, r"must be in \[0, 1\)"),
    ],
)
def test_split_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        split_prompts(_records(5), seed=0, **kwargs)


# -- stream -----------------------------------------------------------------------------------


def test_stream_covers_each_epoch_once_with_global_indices():
    records = _records(7)
    stream = PromptStream(records, seed=3)
    batch = stream.next_batch(10)
    assert [index for index, _ in batch] == list(range(10))
    first_epoch = [record for _, record in batch[:7]]
    assert sorted(first_epoch, key=records.index) == records
    assert stream.epoch == 1
    assert stream.global_index == 10
    # each epoch gets its own order
    second_epoch = [record for _, record in batch[7:]] + [r for _, r in stream.next_batch(4)]
    assert second_epoch != first_epoch


def test_stream_order_depends_only_on_seed_and_epoch():
    records = _records(30)
    drawn = [r.text for _, r in PromptStream(records, seed=5).next_batch(60)]
    assert drawn == [r.text for _, r in PromptStream(records, seed=5).next_batch(60)]
    assert drawn != [r.text for _, r in PromptStream(records, seed=6).next_batch(60)]
    assert [r for _, r in PromptStream(records, seed=5, shuffle=False).next_batch(30)] == records


def test_stream_is_an_iterator():
    stream = PromptStream(_records(3), seed=0)
    assert [index for index, _ in zip(range(5), stream, strict=False)] == [0, 1, 2, 3, 4]
    assert stream.epoch == 1


def test_stream_state_round_trip_restores_exact_position():
    records = _records(11)
    stream = PromptStream(records, seed=9)
    stream.next_batch(7)
    state = json.loads(json.dumps(stream.state_dict()))  # must survive state.json
    expected = stream.next_batch(5)  # crosses into epoch 1

    restored = PromptStream(records, seed=9)
    restored.load_state_dict(state)
    assert restored.next_batch(5) == expected
    assert restored.epoch == stream.epoch == 1
    assert restored.next_batch(20) == stream.next_batch(20)


def test_stream_refuses_state_from_another_setup():
    stream = PromptStream(_records(10), seed=1)
    stream.next_batch(3)
    state = stream.state_dict()
    with pytest.raises(DrpoError, match="different prompt set"):
        PromptStream(_records(11), seed=1).load_state_dict(state)
    with pytest.raises(DrpoError, match="saved with seed=1"):
        PromptStream(_records(10), seed=2).load_state_dict(state)


def test_stream_needs_prompts():
    with pytest.raises(DrpoError, match="no prompts"):
        PromptStream([], seed=0)
