"""The one JSON-lines reader (drpo_core.jsonl) and the readers built on it: rows with their line numbers,
and one line naming ``file:line`` for every kind of bad input."""

import json

import pytest

from drpo_core.errors import DrpoError
from drpo_core.jsonl import read_jsonl
from drpo_core.metrics import read_metrics
from drpo_core.prompts import load_prompts
from drpo_core.runs import score_manifest
from drpo_core.sources import read_pairs


def _write(path, data: str | bytes):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _error(path, **kwargs) -> str:
    with pytest.raises(DrpoError) as info:
        read_jsonl(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_rows_keep_their_line_numbers_past_blank_lines(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"a": 1}\n\n   \n{"a": 2, "b": [1]}\r\n{"a": "x\u2028y"}\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"a": 2, "b": [1]}), (5, {"a": "x\u2028y"})]


def test_a_last_line_without_newline_is_read_unless_torn_lines_are_skipped(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"a": 1}\n{"a": 2}')
    assert read_jsonl(path) == [(1, {"a": 1}), (2, {"a": 2})]
    assert read_jsonl(path, skip_torn=True) == [(1, {"a": 1})]
    _write(path, '{"a": 1}\n{"a": 2')  # the writer died mid-line
    assert read_jsonl(path, skip_torn=True) == [(1, {"a": 1})]
    assert _error(path).startswith(f"{path}:2: bad JSON (")


def test_byte_order_mark_and_empty_file(tmp_path):
    assert read_jsonl(_write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"a": 1}\n')) == [(1, {"a": 1})]
    assert read_jsonl(_write(tmp_path / "empty.jsonl", "")) == []
    assert read_jsonl(_write(tmp_path / "blank.jsonl", "\n\n"), skip_torn=True) == []


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        (b'{"a": 1}\n{"a": oops}\n', {}, "{path}:2: bad JSON (Expecting value at column 7)"),
        (b'{"a": 1}\n\n[1, 2]\n', {}, "{path}:3: expected a JSON object, got list"),
        (b'"text"\n', {}, "{path}:1: expected a JSON object, got str"),
        (b'{"a": 1}\n{"a": "caf\xe9"}\n', {}, "{path}:2: not UTF-8 text (bad byte at column 11)"),
        (b'{"prompt": "x"}\n{"tag": 1}\n', {"required": ("prompt",)}, '{path}:2: missing "prompt" key'),
        (b'{"tag": 1}\n', {"required": ("prompt", "tag", "file")}, '{path}:1: missing "prompt", "file" keys'),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text, kwargs, message):
    path = _write(tmp_path / "bad.jsonl", text)
    assert _error(path, **kwargs) == message.format(path=path)


def test_missing_file_and_directory_are_named_with_what_they_are(tmp_path):
    assert _error(tmp_path / "none.jsonl", what="manifest") == f"manifest not found: {tmp_path / 'none.jsonl'}"
    assert _error(tmp_path, what="manifest") == f"manifest is not a file: {tmp_path}"


# -- the readers built on it -------------------------------------------------------------------------


def test_geneval_prompt_file_errors(tmp_path):
    bad = _write(tmp_path / "meta.jsonl", '{"prompt": "a cat", "tag": "single"}\n{"tag": "x"}\n')
    with pytest.raises(DrpoError, match=f'^{bad}:2: missing "prompt" key$'):
        load_prompts(bad)
    with pytest.raises(DrpoError, match=r'meta.jsonl:1: "prompt" must be a non-empty string'):
        load_prompts(_write(bad, '{"prompt": 3}\n'))
    with pytest.raises(DrpoError, match="^prompt file not found: "):
        load_prompts(tmp_path / "nope.jsonl")
    [record] = load_prompts(_write(bad, '\n{"prompt": " a cat ", "tag": "single"}\n'))
    assert (record.text, record.metadata) == ("a cat", {"prompt": " a cat ", "tag": "single"})


def test_metrics_errors_and_the_torn_last_line(tmp_path):
    path = _write(tmp_path / "metrics.jsonl", '{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    _write(path, '{"step": 1}\n[2]\n')
    with pytest.raises(DrpoError, match=r"metrics.jsonl:2: expected a JSON object, got list"):
        read_metrics(path)


def test_offline_pairs_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    pairs = tmp_path / "pairs.jsonl"
    cases = [
        ({"prompt": "a cat", "chosen": "a.png"}, 'pairs.jsonl:2: missing "rejected" key'),
        ({"prompt": 3, "chosen": "a.png", "rejected": []}, 'pairs.jsonl:2: "prompt" must be a string'),
        ({"prompt": "a cat", "chosen": {"x": 1}, "rejected": []}, 'pairs.jsonl:2: "chosen" must be a path or a list'),
        ({"prompt": "a cat", "chosen": "a.png", "rejected": ["b.png"]}, "pairs.jsonl:2: rejected image not found: b.png"),
    ]
    good = {"prompt": "a dog", "chosen": "a.png", "rejected": ["a.png", "a.png"]}
    for row, message in cases:
        pairs.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DrpoError, match=message):
            read_pairs(pairs)
    pairs.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "rejected": "a.png"}) + "\n")
    image = tmp_path / "a.png"
    assert read_pairs(pairs) == {"a dog": {"chosen": [image, image], "rejected": [image, image, image]}}
    with pytest.raises(DrpoError, match="^source.path: offline pairs file not found: "):
        read_pairs(tmp_path / "none.jsonl")


def test_manifest_rows_need_a_prompt_and_a_file(tmp_path):
    manifest = _write(tmp_path / "manifest.jsonl", '{"prompt": "a cat", "file": "a.png"}\n{"prompt": "a dog"}\n')
    with pytest.raises(DrpoError, match='manifest.jsonl:2: missing "file" key'):
        score_manifest(manifest, [])
    with pytest.raises(DrpoError, match="^manifest not found: "):
        score_manifest(tmp_path / "none.jsonl", [])
