"""Reading text, the fixed split, packing into windows, and clear errors for unusable input."""

from __future__ import annotations

import pytest
import torch

from echoatt.corpus import (
    CorpusError,
    Document,
    detokenize_brown,
    pack,
    read_documents,
    split_documents,
    token_windows,
)


def test_detokenize_brown():
    tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` it's/pps+bez fine/jj ''/'' ,/, (/( he/pps added/vbd )/) ./.\n"
    assert detokenize_brown(tagged) == 'The jury said "it\'s fine", (he added).'


def test_read_folder_of_txt_and_jsonl(corpus_dir):
    docs = read_documents(corpus_dir)
    assert len(docs) == 15
    assert {d.name for d in docs} >= {"doc00.txt", "more.jsonl:0"}


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_documents(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no text found"):
        read_documents(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:1"):
        read_documents(bad)


def test_split_is_fixed_and_disjoint():
    many = [Document(f"d{i}", f"text {i} " * 20) for i in range(40)]
    train, val = split_documents(many)
    assert {d.name for d in train}.isdisjoint({d.name for d in val}) and val and train
    assert split_documents(list(reversed(many)))[1] == list(reversed(val))  # by name, not by position
    few = [Document("a", "one two three four five six seven eight nine ten eleven twelve")]
    train, val = split_documents(few)
    assert train[0].text + val[0].text == few[0].text and val[0].text


def test_pack_and_windows(tokenizer, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    windows = pack(tokenizer, [Document("a", "a single man " * 40)], 16)
    assert windows.shape[1] == 16 and windows.shape[0] > 2
    train, val = token_windows(tokenizer, str(corpus_dir), 32)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the token cache must never be unpickled"))
    again = token_windows(tokenizer, str(corpus_dir), 32)  # from the cache
    assert train.shape[1] == 32 and len(val) > 0 and (again[0] == train).all()
    cached = list((tmp_path / "cache" / "tokens").iterdir())
    assert cached and all(f.suffix == ".safetensors" for f in cached)
    with pytest.raises(CorpusError, match="corpus too short"):
        token_windows(tokenizer, str(corpus_dir), 100_000)


def test_teacher_writes_windows_reproducibly_and_caches_them(teacher_dir, tmp_path, monkeypatch):
    from echoatt.corpus import generated_windows
    from echoatt.teacher import load_teacher

    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    teacher = load_teacher(str(teacher_dir))
    windows = generated_windows(teacher, 5, 16, seed=3, batch=2)
    assert windows.shape == (5, 16) and windows.dtype == torch.long
    assert 0 <= windows.min() and windows.max() < teacher.model.config.vocab_size
    assert not (windows == teacher.tokenizer.bos_token_id).all(dim=1).any()  # the prompt itself is not kept
    assert len(list((tmp_path / "cache" / "generated").iterdir())) == 1
    teacher.model.generate = None  # a second call must read the cache, not sample again
    assert torch.equal(generated_windows(teacher, 5, 16, seed=3, batch=2), windows)
    del teacher.model.generate
    assert not torch.equal(generated_windows(teacher, 5, 16, seed=4, batch=2), windows)
