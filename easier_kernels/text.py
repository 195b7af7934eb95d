"""Real text datasets: a causal language model's token blocks, or labelled sentences, split into train / val / test.

    from easier_kernels import text
    tok = text.tokenizer("bytes")                                  # utf-8 bytes: 256 ids, nothing to train
    splits = text.load("text:shakespeare.txt", tok, seq_len=128)   # causal LM: blocks of 128 tokens
    splits = text.load("text:shakespeare.txt", "bpe:4096", tokenizer_folder=run)  # trains a BPE on the train part
    splits = text.load("tsv:sst2/", "bytes", seq_len=64)           # classification: train.tsv, dev.tsv (, test.tsv)
    splits.train, splits.val, splits.test      # TokenBlocks or LabeledTexts (test None: a folder without test.tsv)
    splits.task, splits.num_labels             # "causal_lm" (num_labels None) or "classification"
    loader = DataLoader(splits.train, batch_size=8, shuffle=True, collate_fn=splits.collate)

Samples shipped in the package (datasets/README.md): TINY_TEXT (30 KB of Shakespeare, for "text:") and
TINY_SST2 (a folder of 400 / 100 / 100 SST-2 sentences, for "tsv:").

Tokenizers (`text.tokenizer(spec, train_text=None, folder=None)`; each has encode, decode, encode_batch,
vocab_size, pad_id, eos_id, spec and save):
  "bytes"       the text's UTF-8 bytes: vocab_size 256, pad_id 0 (NUL), no eos.
  "bpe:N"       a byte-level BPE of N tokens (the `tokenizers` package; N >= 258: the 256 bytes and the
                special tokens <|pad|> = 0 and <|endoftext|> = 1), trained on `train_text` (str items, the
                training split only) unless `folder`/tokenizer.json exists: then it is loaded, so that a
                rebuilt model reads the same ids. After training it is saved there.
  "file:PATH"   a saved tokenizer.json.
  "hf:FOLDER"   (or a bare folder path) transformers' AutoTokenizer from that folder, nothing downloaded;
                pad_id is its pad token, else its eos token, else 0.
BPE and hf tokenizers encode each line by itself (one batch call), so a text cut at line ends gives the
same ids in pieces as whole: what lets `load` tokenize a file in chunks.

Datasets (`text.load(spec, tokenizer, *, seq_len=128, split=(0.9, 0.05, 0.05), split_seed=0,
cache_dir=None, tokenizer_folder=None)`; `tokenizer` is a built Tokenizer or its spec string):
  "text:PATH"   causal LM. The file is cut BY POSITION into train / val / test (the `split` fractions of
                its bytes, each cut moved to the next line end), each part tokenized in ~1 MB chunks of
                whole lines into a flat token file (uint16, or int32 past 65,536 tokens) in `cache_dir`
                (default: a temporary folder kept for the process), named from a hash of the file (path,
                size, mtime), the tokenizer and the split, so a second load reuses it. Item i of TokenBlocks is
                tokens[i*seq_len:(i+1)*seq_len] as {"input_ids": int64 [seq_len], "labels": the same tensor}:
                the model shifts them for its next-token loss.
  "tsv:PATH"    classification, lines `text<TAB>label` with integer labels 0..K-1 (a first line whose label
                is not an integer is a header). A folder holds train.tsv, dev.tsv (val) and optionally
                test.tsv (`split` is then unused); one file is split by a seeded permutation (`split_seed`) in
                the `split` fractions. Texts are tokenized once, held in memory, truncated to seq_len tokens
                (hf tokenizers add their special tokens, [CLS] ... [SEP], as their models were trained with).
                Items {"input_ids": int64 [L], "labels": int64 []}; splits.collate pads a batch to its longest
                with pad_id: {"input_ids" [B, L], "attention_mask" [B, L] (1 = a real token), "labels" [B]}.
Given a "bpe:N" spec string, `load` trains the BPE itself on the train part only (the lines of the train
cut, or the train sentences), loading / saving it in `tokenizer_folder` when one is given (a run's
folder: without one it is trained again at each load). splits.tokenizer is the tokenizer used.

Errors are one line saying what to do: FileNotFoundError for missing files and folders, ValueError for bad
arguments and unreadable or too short data (a TSV error names file:LINE; a non-UTF-8 file its byte offset).
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import importlib
import io
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

__all__ = ["SPECS", "TINY_TEXT", "TINY_SST2", "Tokenizer", "BytesTokenizer", "BPETokenizer", "HFTokenizer",
           "TokenBlocks", "LabeledTexts", "PadCollate", "TextSplits", "tokenizer", "load", "is_text"]

SPECS = ("text:", "tsv:")
TINY_TEXT = Path(__file__).parent / "datasets" / "tiny_text.txt"
TINY_SST2 = Path(__file__).parent / "datasets" / "tiny_sst2"
CHUNK_BYTES = 1 << 20  # a text file is read and tokenized this many bytes (rounded up to a line end) at a time
PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"
MIN_BPE = 258  # the 256 byte tokens and the two special ones: BPE's vocabulary before any merge
_TOKENIZER_FORMS = "bytes, bpe:N (an integer N >= 258), hf:FOLDER (or a folder path) or file:PATH (a tokenizer.json)"
_CACHE_VERSION = 1  # bump when the token files' layout changes: old ones are then not reused


def is_text(spec) -> bool:
    """Whether a --dataset value names a text dataset ("text:PATH" or "tsv:PATH")."""
    return isinstance(spec, str) and spec.startswith(SPECS)


# ---- tokenizers


class Tokenizer:
    """What every tokenizer offers; the subclasses wrap one kind each."""

    spec: str  # what a record holds to build this tokenizer again, e.g. "bpe:4096"
    vocab_size: int
    pad_id: int
    eos_id: int | None

    def encode(self, s: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], *, max_length: int | None = None,
                     special_tokens: bool = False) -> list[list[int]]:
        """Each text's ids, truncated to max_length (special_tokens: hf tokenizers' [CLS] ... [SEP])."""
        return [self.encode(t)[:max_length] for t in texts]

    def save(self, folder) -> None:
        """Writes what `tokenizer(self.spec, folder=folder)` needs to give the same ids (nothing for bytes)."""

    @property
    def fingerprint(self) -> str:
        """Changes whenever the ids would: part of the token cache's key."""
        return self.spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"


class BytesTokenizer(Tokenizer):
    """The UTF-8 bytes of the text: 256 ids, pad 0 (NUL)."""

    spec, vocab_size, pad_id, eos_id = "bytes", 256, 0, None

    def encode(self, s: str) -> list[int]:
        return list(s.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")  # ids cut mid-character: U+FFFD


class BPETokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` ("bpe:N" trained here, or "file:PATH"), encoding line by line."""

    def __init__(self, backend, spec: str):
        self.backend, self.spec = backend, spec
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        pad = backend.token_to_id(PAD_TOKEN)
        self.pad_id = 0 if pad is None else pad
        self.eos_id = backend.token_to_id(EOS_TOKEN)

    def encode(self, s: str) -> list[int]:
        return list(itertools.chain.from_iterable(self.encode_batch(_lines(s))))

    def encode_batch(self, texts, *, max_length=None, special_tokens=False) -> list[list[int]]:
        # the batch call runs on every core; no special tokens are added by this pipeline anyway
        return [e.ids[:max_length] for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids])

    def save(self, folder) -> None:
        _write_atomically(Path(folder) / "tokenizer.json", self.backend.to_str())

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()[:16]


class HFTokenizer(Tokenizer):
    """transformers' tokenizer from a local folder ("hf:FOLDER")."""

    def __init__(self, backend, spec: str):
        self.backend, self.spec = backend, spec
        self.vocab_size = len(backend)  # with the added tokens, which the model's embedding covers
        self.eos_id = backend.eos_token_id
        self.pad_id = next((i for i in (backend.pad_token_id, backend.eos_token_id) if i is not None), 0)

    def encode(self, s: str) -> list[int]:
        return list(itertools.chain.from_iterable(self.encode_batch(_lines(s))))

    def encode_batch(self, texts, *, max_length=None, special_tokens=False) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: a long line is no error here (it is cut into blocks), so no "too long" warning
        ids = self.backend(list(texts), add_special_tokens=special_tokens, truncation=max_length is not None,
                           max_length=max_length, verbose=False)["input_ids"]
        return [list(i) for i in ids]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids])

    def save(self, folder) -> None:
        self.backend.save_pretrained(str(folder))

    @property
    def fingerprint(self) -> str:
        vocab = json.dumps(sorted(self.backend.get_vocab().items()))
        return hashlib.sha256(f"{self.spec}|{vocab}".encode("utf-8")).hexdigest()[:16]


def tokenizer(spec: str, train_text: Iterable[str] | None = None, folder=None) -> Tokenizer:
    """The tokenizer `spec` names (see the module docstring); `train_text` and `folder` serve "bpe:N" only."""
    if isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a tokenizer is given as a string, not {spec!r}; use {_TOKENIZER_FORMS}")
    if spec == "bytes":
        return BytesTokenizer()
    if spec.startswith("bpe:"):
        return _bpe(spec, _bpe_size(spec), train_text, folder)
    if spec.startswith("file:"):
        return _tokenizer_file(Path(spec[len("file:"):]).expanduser(), spec)
    if spec.startswith("hf:"):
        return _hf(Path(spec[len("hf:"):]).expanduser(), spec)
    if spec and Path(spec).expanduser().is_dir():
        return _hf(Path(spec).expanduser(), f"hf:{spec}")
    raise ValueError(f"unknown tokenizer {spec!r}; use {_TOKENIZER_FORMS}")


def _bpe_size(spec: str) -> int:
    try:
        size = int(spec[len("bpe:"):])
    except ValueError:
        raise ValueError(f"{spec}: N must be an integer, as in bpe:4096") from None
    if size < MIN_BPE:
        raise ValueError(f"{spec}: N must be at least {MIN_BPE} (the 256 bytes and the tokens {PAD_TOKEN}, {EOS_TOKEN})")
    return size


def _bpe(spec: str, size: int, train_text, folder) -> BPETokenizer:
    """Loaded from folder/tokenizer.json where that exists, else trained on train_text (and saved there)."""
    saved = None if folder is None else Path(folder) / "tokenizer.json"
    if saved is not None and saved.is_file():
        tok = _tokenizer_file(saved, spec)
        if tok.vocab_size != size:
            raise ValueError(f"{saved} holds a tokenizer of {tok.vocab_size} tokens, not {size}: ask for "
                             f"bpe:{tok.vocab_size}, or delete it to train a new one")
        return tok
    if train_text is None:
        raise ValueError(f"{spec} must be trained: give train_text (the training split's text), a folder holding "
                         "its tokenizer.json, or pass the spec to text.load, which trains it on the train split")
    tok = BPETokenizer(_train_bpe(size, train_text), spec)
    if tok.vocab_size != size:  # the text ran out of pairs to merge
        raise ValueError(f"{spec}: the training text yields only {tok.vocab_size} tokens; ask for "
                         f"bpe:{tok.vocab_size} or less, or give more text")
    if saved is not None:
        tok.save(saved.parent)
    return tok


def _train_bpe(size: int, train_text: Iterable[str]):
    tokenizers = _optional("tokenizers", "bpe: and file: tokenizers", "pip install tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # a line's first word keeps its own ids
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[PAD_TOKEN, EOS_TOKEN], show_progress=False)
    # trained on lines, as it encodes: the batches of lines of each item
    backend.train_from_iterator((_lines(item) for item in train_text), trainer)
    return backend


def _tokenizer_file(path: Path, spec: str) -> BPETokenizer:
    tokenizers = _optional("tokenizers", "bpe: and file: tokenizers", "pip install tokenizers")
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such file {path}; give the path of a tokenizer.json")
    try:
        return BPETokenizer(tokenizers.Tokenizer.from_file(str(path)), spec)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"cannot read the tokenizer {path} ({_one_line(e)}): not a tokenizers tokenizer.json") from e


def _hf(folder: Path, spec: str) -> HFTokenizer:
    if not folder.is_dir():
        raise FileNotFoundError(f"{spec}: no such folder {folder}; give a folder holding a transformers tokenizer")
    transformers = _optional("transformers", "hf: tokenizers", "pip install 'easier_kernels[hf]'")
    try:
        backend = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{spec}: cannot load a tokenizer from {folder} ({_one_line(e)[:300]})") from e
    return HFTokenizer(backend, spec)


def _optional(module: str, what: str, install: str):
    """`module` imported, or an ImportError saying how to install it."""
    if module == "transformers":  # it imports torchvision where installed, which needs compat's workaround
        from .compat import import_torchvision

        try:
            import_torchvision()
        except ImportError:
            pass
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} need {module}, which is not importable ({_one_line(e)}): {install}") from e


def _lines(s: str) -> list[str]:
    """s cut after each "\\n" (the ends kept). Not str.splitlines: that also cuts at \\x0c, \\x1c, U+2028..."""
    parts = s.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


# ---- datasets


class TokenBlocks(Dataset):
    """Non-overlapping blocks of seq_len tokens of a flat token array or file: item i is
    {"input_ids": tokens[i*seq_len:(i+1)*seq_len] as int64, "labels": the same tensor}; a last partial block is dropped.

    A file's dtype is its suffix (".uint16" or ".int32"; uint16 for any other) unless given. It is memory-mapped when first read,
    in each process (DataLoader workers get the path, not the tokens)."""

    def __init__(self, path_or_array, seq_len: int, *, dtype=None):
        _check_seq_len(seq_len)
        self.seq_len = seq_len
        if isinstance(path_or_array, (str, os.PathLike)):
            self.path = Path(path_or_array)
            suffix = self.path.suffix.lstrip(".")
            self.dtype = np.dtype(dtype or (suffix if suffix in ("uint16", "int32") else "uint16"))
            self.num_tokens = self.path.stat().st_size // self.dtype.itemsize
            self._tokens = None
        else:
            self.path, self._tokens = None, np.asarray(path_or_array)
            self.dtype, self.num_tokens = self._tokens.dtype, len(self._tokens)

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} of {len(self)}")
        i %= len(self)
        block = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))
        return {"input_ids": block, "labels": block}

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:  # (np.memmap refuses an empty file: len() is 0 then and nothing reads)
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None} if self.path is not None else self.__dict__


class LabeledTexts(Dataset):
    """Tokenized texts with integer labels: item i is {"input_ids": int64 [L_i], "labels": int64 []}."""

    def __init__(self, ids: list[list[int]], labels: list[int]):
        if len(ids) != len(labels):
            raise ValueError(f"LabeledTexts: {len(ids)} texts but {len(labels)} labels")
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": torch.tensor(self.ids[i], dtype=torch.int64),
                "labels": torch.tensor(self.labels[i], dtype=torch.int64)}


class PadCollate:
    """Pads a batch of LabeledTexts items to its longest with pad_id (a class: DataLoader workers pickle it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), length), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.int64)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": torch.stack([item["labels"] for item in batch])}


@dataclass
class TextSplits:
    train: TokenBlocks | LabeledTexts
    val: TokenBlocks | LabeledTexts
    test: TokenBlocks | LabeledTexts | None
    task: str  # "causal_lm" or "classification"
    num_labels: int | None
    tokenizer: Tokenizer
    seq_len: int
    collate: Callable
    source: str


def load(spec: str, tokenizer, *, seq_len: int = 128, split=(0.9, 0.05, 0.05), split_seed: int = 0,
         cache_dir=None, tokenizer_folder=None) -> TextSplits:
    """The text dataset `spec` ("text:PATH" or "tsv:PATH"), tokenized by `tokenizer` (a Tokenizer or its spec)."""
    if not is_text(spec):
        raise ValueError(f"unknown text dataset {spec!r}; use text:PATH (a text file, for a causal LM) or "
                         "tsv:PATH (text<TAB>label lines, or a folder of train.tsv, dev.tsv, test.tsv)")
    _check_seq_len(seq_len)
    split = _check_split(split)
    if spec.startswith("text:"):
        return _causal_lm(spec, tokenizer, seq_len, split, cache_dir, tokenizer_folder)
    return _classification(spec, tokenizer, seq_len, split, split_seed, tokenizer_folder)


def _check_seq_len(seq_len) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer of at least 2, not {seq_len!r}")


def _check_split(split) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split must be three fractions (train, val, test), each above 0, summing to 1; not {split!r}")
    return fractions


# ---- text: a causal LM's token blocks


def _causal_lm(spec: str, tok, seq_len: int, split, cache_dir, tokenizer_folder) -> TextSplits:
    path = Path(spec[len("text:"):]).expanduser()
    if path.is_dir():
        raise ValueError(f"{spec} is a folder; text: takes one UTF-8 text file (tsv:FOLDER takes a folder of .tsv files)")
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such file; pass text:PATH to a UTF-8 text file "
                                "(or tsv:PATH for text<TAB>label lines)")
    stat = path.stat()
    if stat.st_size == 0:
        raise ValueError(f"{spec}: the file is empty (0 tokens); give it text")
    bounds = _cut_points(path, stat.st_size, split)
    parts = dict(zip(("train", "val", "test"), zip(bounds, bounds[1:])))
    # a generator: the train part is read only if a BPE is trained on it
    tok = tokenizer(tok, train_text=_read_chunks(path, *parts["train"]), folder=tokenizer_folder)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    key = _cache_key(path, stat, tok, split, dtype)
    folder = Path(cache_dir) if cache_dir is not None else _process_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    blocks = {}
    for name, (start, end) in parts.items():
        file = folder / f"{path.stem}-{key}-{name}.{np.dtype(dtype).name}"
        if not file.is_file():  # a second load with the same file, tokenizer and split reuses it
            _write_tokens(file, path, start, end, tok, dtype)
        blocks[name] = TokenBlocks(file, seq_len)
        if len(blocks[name]) == 0:
            raise ValueError(f"{spec}: the {name} part holds {blocks[name].num_tokens} tokens, fewer than one block of "
                             f"seq_len={seq_len}; lower --seq-len or give more text")
    return TextSplits(blocks["train"], blocks["val"], blocks["test"], task="causal_lm", num_labels=None, tokenizer=tok,
                      seq_len=seq_len, collate=default_collate, source=spec)


def _cut_points(path: Path, size: int, split) -> list[int]:
    """[0, train end, val end, size]: the fractions' byte positions, each moved to the next line end."""
    with open(path, "rb") as f:
        cuts = [_next_line_start(f, round(size * fraction), size) for fraction in itertools.accumulate(split[:2])]
    return [0, cuts[0], max(cuts), size]


def _next_line_start(f, offset: int, size: int) -> int:
    """The first position at or after offset that starts a line (or the end of the file)."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    f.seek(offset - 1)  # from the byte before: if that ends a line, offset is already a line start
    return offset - 1 + len(f.readline())


def _read_chunks(path: Path, start: int, end: int) -> Iterator[str]:
    """The bytes start..end of the file (both at line starts) as text, ~CHUNK_BYTES of whole lines at a time."""
    with open(path, "rb") as f:
        f.seek(start)
        position = start
        while position < end:
            data = f.read(min(CHUNK_BYTES, end - position))
            if position + len(data) < end and not data.endswith(b"\n"):
                data += f.readline()  # up to the line's end, which is at most `end` (a line start)
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text: byte {position + e.start} ({data[e.start:e.start + 1]!r}) "
                                 "cannot be decoded; convert the file to UTF-8") from None
            position += len(data)


def _write_tokens(file: Path, path: Path, start: int, end: int, tok: Tokenizer, dtype) -> None:
    """Tokenizes bytes start..end of path chunk by chunk into `file`, atomically (a temporary file renamed)."""
    with tempfile.NamedTemporaryFile(dir=file.parent, prefix=file.name, suffix=".part", delete=False) as out:
        try:
            for chunk in _read_chunks(path, start, end):
                ids = (np.frombuffer(chunk.encode("utf-8"), dtype=np.uint8) if isinstance(tok, BytesTokenizer)
                       else np.fromiter(tok.encode(chunk), dtype=np.int64))
                out.write(ids.astype(dtype).tobytes())
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    os.replace(out.name, file)


def _cache_key(path: Path, stat, tok: Tokenizer, split, dtype) -> str:
    what = [_CACHE_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns, tok.spec, tok.vocab_size,
            tok.fingerprint, list(split), np.dtype(dtype).name]
    return hashlib.sha256(json.dumps(what).encode("utf-8")).hexdigest()[:16]


_cache_dir: Path | None = None


def _process_cache_dir() -> Path:
    """A temporary folder for this process's token files, removed when it exits."""
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="easier_kernels_text-"))
        atexit.register(shutil.rmtree, _cache_dir, True)
    return _cache_dir


# ---- tsv: labelled texts


def _classification(spec: str, tok, seq_len: int, split, split_seed: int, tokenizer_folder) -> TextSplits:
    path = Path(spec[len("tsv:"):]).expanduser()
    if path.is_dir():
        parts = _tsv_folder(spec, path)
    elif path.is_file():
        parts = _tsv_split(_read_tsv(path), split, split_seed, spec)
    else:
        raise FileNotFoundError(f"{spec}: no such file or folder; pass tsv:PATH to a file of text<TAB>label lines "
                                "or to a folder holding train.tsv, dev.tsv and optionally test.tsv")
    train = parts["train"]
    tok = tokenizer(tok, train_text=(text for text, _, _ in train), folder=tokenizer_folder)
    num_labels = max(label for _, label, _ in train) + 1
    for name, examples in parts.items():
        for _, label, where in examples or ():
            if label >= num_labels:
                raise ValueError(f"{where}: label {label} is outside the training labels 0..{num_labels - 1}")
    data = {name: None if examples is None else _labeled(examples, tok, seq_len) for name, examples in parts.items()}
    return TextSplits(data["train"], data["val"], data["test"], task="classification", num_labels=num_labels,
                      tokenizer=tok, seq_len=seq_len, collate=PadCollate(tok.pad_id), source=spec)


def _labeled(examples, tok: Tokenizer, seq_len: int) -> LabeledTexts:
    ids = tok.encode_batch([text for text, _, _ in examples], max_length=seq_len, special_tokens=True)
    for one, (_, _, where) in zip(ids, examples):
        if not one:  # a batch of them would be all padding
            raise ValueError(f"{where}: the text gives no tokens; remove the line or give it text")
    return LabeledTexts(ids, [label for _, label, _ in examples])


def _tsv_folder(spec: str, folder: Path) -> dict:
    files = {"train": folder / "train.tsv", "val": folder / "dev.tsv", "test": folder / "test.tsv"}
    missing = [files[name].name for name in ("train", "val") if not files[name].is_file()]
    if missing:
        raise FileNotFoundError(f"{spec}: the folder lacks {' and '.join(missing)} (a tsv folder holds train.tsv, "
                                "dev.tsv and optionally test.tsv)")
    return {name: _read_tsv(file) if file.is_file() else None for name, file in files.items()}


def _read_tsv(path: Path) -> list[tuple[str, int, str]]:
    """(text, label, "path:line") of each line `text<TAB>label`; a first line without an integer label is a header."""
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text: byte {e.start} ({raw[e.start:e.start + 1]!r}) cannot be "
                         "decoded; convert the file to UTF-8") from None
    examples = []
    # QUOTE_NONE: the sentences hold quote characters that are text, not CSV quoting
    reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    for row in reader:
        if not row:  # a blank line
            continue
        where = f"{path}:{reader.line_num}"
        label = _label(row)
        if label is None and reader.line_num == 1 and len(row) == 2:
            continue  # the header, e.g. "sentence<TAB>label"
        if label is None:
            raise ValueError(f"{where}: expected 'text<TAB>label' with an integer label, got {_excerpt(row)}")
        if label < 0:
            raise ValueError(f"{where}: label {label} is negative; labels are 0..K-1")
        examples.append((row[0], label, where))
    if not examples:
        raise ValueError(f"{path}: no text<TAB>label lines in it; give it labelled examples")
    return examples


def _label(row: list[str]) -> int | None:
    if len(row) != 2:
        return None
    try:
        return int(row[1].strip())
    except ValueError:
        return None


def _excerpt(row: list[str]) -> str:
    line = "\t".join(row)
    return repr(line if len(line) <= 80 else line[:77] + "...")


def _tsv_split(examples: list, split, seed: int, spec: str) -> dict:
    """One file's examples cut into train / val / test by a seeded permutation, each part in file order."""
    size = len(examples)
    if size < 3:
        raise ValueError(f"{spec}: {size} example(s); a train/val/test split needs at least 3")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = (min(max(round(size * f), 1), size - 2) for f in split[1:])  # one example each, at least
    n_test = min(n_test, size - 1 - n_val)
    cuts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {name: [examples[i] for i in cuts[name].sort().values.tolist()] for name in ("train", "val", "test")}


# ---- shared helpers


def _write_atomically(path: Path, content: str) -> None:
    """path holds content, or its former state: written to a temporary file in its folder, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=path.name, suffix=".part",
                                     delete=False) as out:
        out.write(content)
    os.replace(out.name, path)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
