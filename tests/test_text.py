"""Text data: tokenizers (bytes, BPE, saved files, hf folders), causal-LM token blocks cut by position and
tokenized in chunks, labelled TSV sentences padded per batch, and one-line errors for bad input."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from easier_kernels import text

SAMPLE = "To be, or not to be: that is the question.\nWhether 'tis nobler — in the mind\n\n  to suffer\n"
BPE_SIZE = 320  # small: trains on the 30 KB sample in a few milliseconds


@pytest.fixture(scope="module")
def bpe():
    return text.tokenizer(f"bpe:{BPE_SIZE}", train_text=[text.TINY_TEXT.read_text(encoding="utf-8")])


def write(path, content):
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def lm_text(tmp_path, lines=60):
    """A small text with distinct numbered lines: where each part starts is easy to read."""
    return write(tmp_path / "corpus.txt", "".join(f"line {i:03d}: the quick brown fox\n" for i in range(lines)))


# ---- tokenizers


def test_bytes_round_trip():
    tok = text.tokenizer("bytes")
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and tok.decode(ids) == SAMPLE
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.spec) == (256, 0, None, "bytes")


def test_bpe_trained_size_and_round_trip(bpe):
    assert bpe.vocab_size == BPE_SIZE and bpe.spec == f"bpe:{BPE_SIZE}"
    assert (bpe.pad_id, bpe.eos_id) == (0, 1)
    ids = bpe.encode(SAMPLE)
    assert bpe.decode(ids) == SAMPLE and max(ids) < BPE_SIZE
    assert len(ids) < len(SAMPLE.encode("utf-8"))  # merges happened


def test_bpe_encodes_line_by_line(bpe):
    # what lets a file be tokenized in chunks of whole lines
    lines = SAMPLE.splitlines(keepends=True)
    assert bpe.encode(SAMPLE) == sum((bpe.encode(line) for line in lines), [])


def test_bpe_saved_and_loaded_instead_of_trained(tmp_path, bpe):
    first = text.tokenizer(f"bpe:{BPE_SIZE}", train_text=[text.TINY_TEXT.read_text()], folder=tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert not list(tmp_path.glob("*.part"))  # the atomic write left no temporary file
    # no train_text: only loading can succeed
    again = text.tokenizer(f"bpe:{BPE_SIZE}", folder=tmp_path)
    from_file = text.tokenizer(f"file:{tmp_path / 'tokenizer.json'}")
    assert again.encode(SAMPLE) == first.encode(SAMPLE) == from_file.encode(SAMPLE)
    assert from_file.spec.startswith("file:") and from_file.pad_id == 0
    with pytest.raises(ValueError, match=f"holds a tokenizer of {BPE_SIZE} tokens, not 400"):
        text.tokenizer("bpe:400", folder=tmp_path)


def test_tokenizer_save_methods(tmp_path, bpe):
    text.tokenizer("bytes").save(tmp_path / "none")
    assert not (tmp_path / "none").exists()
    bpe.save(tmp_path / "run")
    assert text.tokenizer(f"bpe:{BPE_SIZE}", folder=tmp_path / "run").encode(SAMPLE) == bpe.encode(SAMPLE)


def test_hf_folder(tmp_path, bpe):
    from easier_kernels.compat import import_torchvision

    import_torchvision()
    transformers = pytest.importorskip("transformers")
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.backend, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    for spec in (f"hf:{tmp_path}", str(tmp_path)):
        tok = text.tokenizer(spec)
        assert tok.spec == f"hf:{tmp_path}" and tok.vocab_size == BPE_SIZE
        assert tok.pad_id == tok.eos_id == 1  # no pad token: its eos pads
        assert tok.encode(SAMPLE) == bpe.encode(SAMPLE) and tok.decode(tok.encode(SAMPLE)) == SAMPLE


@pytest.mark.parametrize("spec, message", [
    ("words", "unknown tokenizer 'words'; use bytes, bpe:N"),
    ("bpe:many", "N must be an integer"),
    ("bpe:257", "at least 258"),
    ("bpe:300", "must be trained"),
])
def test_bad_tokenizer_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        text.tokenizer(spec)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        text.tokenizer(f"file:{tmp_path / 'nope.json'}")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        text.tokenizer(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="cannot read the tokenizer"):
        text.tokenizer(f"file:{write(tmp_path / 'bad.json', '{not json')}")


def test_is_text():
    assert text.is_text("text:a.txt") and text.is_text("tsv:folder")
    assert not text.is_text("cifar10") and not text.is_text(None)


# ---- text: causal LM blocks


def parts_of(path, split=(0.9, 0.05, 0.05)):
    """The three parts' text, cut as the module documents: at each fraction's byte, moved to the next line start."""
    data = path.read_bytes()
    cuts, total = [0], 0.0
    for fraction in split[:2]:
        total += fraction
        at = round(len(data) * total)
        cuts.append(at if at == 0 or data[at - 1:at] == b"\n" else data.index(b"\n", at) + 1)
    cuts.append(len(data))
    return [data[a:b].decode() for a, b in zip(cuts, cuts[1:])]


def test_blocks_are_the_parts_tokens(tmp_path):
    path = lm_text(tmp_path)
    splits = text.load(f"text:{path}", "bytes", seq_len=16, cache_dir=tmp_path / "cache")
    assert splits.task == "causal_lm" and splits.num_labels is None and splits.source == f"text:{path}"
    tok = splits.tokenizer
    for part, data in zip(parts_of(path), (splits.train, splits.val, splits.test)):
        ids = tok.encode(part)
        assert len(data) == len(ids) // 16
        item = data[len(data) - 1]
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (16,)
        assert item["labels"] is item["input_ids"]
        assert data[0]["input_ids"].tolist() == ids[:16]
        assert item["input_ids"].tolist() == ids[(len(data) - 1) * 16:len(data) * 16]


def test_parts_are_disjoint_by_position(tmp_path):
    path = lm_text(tmp_path)
    train, val, test = parts_of(path)
    assert train + val + test == path.read_text()
    assert all(part.endswith("\n") for part in (train, val, test))  # cut at line ends
    splits = text.load(f"text:{path}", "bytes", seq_len=8, cache_dir=tmp_path / "cache")
    # the last line of train comes before the first of val, and val's before test's
    first_line = lambda data: bytes(data[0]["input_ids"].tolist()).decode()  # noqa: E731
    assert first_line(splits.train).startswith("line 000")
    assert first_line(splits.val).startswith(val[:8]) and first_line(splits.test).startswith(test[:8])
    assert int(val[5:8]) > int(train.splitlines()[-1][5:8]) and int(test[5:8]) > int(val.splitlines()[-1][5:8])


def test_custom_split(tmp_path):
    path = lm_text(tmp_path)
    splits = text.load(f"text:{path}", "bytes", seq_len=8, split=(0.5, 0.25, 0.25), cache_dir=tmp_path / "cache")
    sizes = [len(p) for p in parts_of(path, (0.5, 0.25, 0.25))]
    assert [d.num_tokens for d in (splits.train, splits.val, splits.test)] == sizes
    assert abs(sizes[0] - sizes[1] * 2) < 80  # about half / a quarter, within a line
    for bad in ((0.9, 0.1, 0.0), (0.5, 0.5, 0.5), (1.0,)):
        with pytest.raises(ValueError, match="split must be three fractions"):
            text.load(f"text:{path}", "bytes", split=bad)


def test_cache_reused(tmp_path, monkeypatch):
    path, cache = lm_text(tmp_path), tmp_path / "cache"
    first = text.load(f"text:{path}", "bytes", seq_len=8, cache_dir=cache)
    files = sorted(cache.iterdir())
    assert len(files) == 3 and all(f.suffix == ".uint16" for f in files)

    def no_tokenizing(*args):
        raise AssertionError("the cached token files should have been reused")

    monkeypatch.setattr(text, "_write_tokens", no_tokenizing)
    second = text.load(f"text:{path}", "bytes", seq_len=8, cache_dir=cache)
    assert sorted(cache.iterdir()) == files
    assert torch.equal(second.train[3]["input_ids"], first.train[3]["input_ids"])
    # another split is another key
    monkeypatch.undo()
    text.load(f"text:{path}", "bytes", seq_len=8, split=(0.8, 0.1, 0.1), cache_dir=cache)
    assert len(list(cache.iterdir())) == 6


def test_streaming_chunks_give_the_same_tokens(tmp_path, monkeypatch, bpe):
    path = write(tmp_path / "tiny.txt", text.TINY_TEXT.read_bytes())
    whole = {name: text.load(f"text:{path}", tok, seq_len=32, cache_dir=tmp_path / "whole")
             for name, tok in (("bytes", "bytes"), ("bpe", bpe))}
    monkeypatch.setattr(text, "CHUNK_BYTES", 100)  # ~300 chunks of a line or two
    for name, tok in (("bytes", "bytes"), ("bpe", bpe)):
        chunked = text.load(f"text:{path}", tok, seq_len=32, cache_dir=tmp_path / f"chunked-{name}")
        for a, b in zip((whole[name].train, whole[name].val, whole[name].test), (chunked.train, chunked.val, chunked.test)):
            assert np.array_equal(a.tokens, b.tokens)
    # and the bytes stream is exactly the file's bytes
    assert bytes(whole["bytes"].train.tokens.astype(np.uint8)) == parts_of(path)[0].encode()


def test_load_trains_bpe_on_the_train_part_only(tmp_path):
    train_words = "".join(f"alpha beta gamma {i}\n" for i in range(200))
    path = write(tmp_path / "c.txt", train_words + "zyzzyva quux\n" * 20)  # val / test words alone
    splits = text.load(f"text:{path}", "bpe:300", seq_len=4, split=(0.9, 0.05, 0.05), tokenizer_folder=tmp_path / "run",
                       cache_dir=tmp_path / "cache")
    tok = splits.tokenizer
    assert tok.vocab_size == 300 and (tmp_path / "run" / "tokenizer.json").is_file()
    assert len(tok.encode(" gamma")) == 1 and len(tok.encode(" quux")) > 1  # never saw the held-out words
    again = text.load(f"text:{path}", "bpe:300", seq_len=4, tokenizer_folder=tmp_path / "run", cache_dir=tmp_path / "cache")
    assert again.tokenizer.encode(SAMPLE) == tok.encode(SAMPLE)
    assert np.array_equal(again.val.tokens, splits.val.tokens)


# ---- tsv: classification


def test_tsv_folder(bpe):
    splits = text.load(f"tsv:{text.TINY_SST2}", bpe, seq_len=64)
    assert splits.task == "classification" and splits.num_labels == 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (400, 100, 100)  # the headers skipped
    item = splits.train[0]
    assert item["labels"].dtype == torch.int64 and item["labels"].shape == ()
    assert bpe.decode(item["input_ids"]) == "when are bears bears and "  # train.tsv's first sentence


def test_tsv_folder_without_test(tmp_path):
    for name in ("train", "dev"):
        write(tmp_path / f"{name}.tsv", "sentence\tlabel\ngood\t1\nbad\t0\nugly\t2\n")
    splits = text.load(f"tsv:{tmp_path}", "bytes", seq_len=8)
    assert splits.test is None and splits.num_labels == 3 and len(splits.train) == 3


def test_tsv_single_file_split(tmp_path):
    lines = "".join(f"sentence number {i}\t{i % 3}\n" for i in range(100))
    path = write(tmp_path / "all.tsv", "text\tlabel\n" + lines)
    splits = text.load(f"tsv:{path}", "bytes", seq_len=32, split=(0.8, 0.1, 0.1), split_seed=1)
    parts = (splits.train, splits.val, splits.test)
    assert [len(p) for p in parts] == [80, 10, 10] and splits.num_labels == 3
    seen = [bytes(p[i]["input_ids"].tolist()).decode() for p in parts for i in range(len(p))]
    assert sorted(seen) == sorted(f"sentence number {i}" for i in range(100))  # disjoint, nothing lost
    other = text.load(f"tsv:{path}", "bytes", seq_len=32, split=(0.8, 0.1, 0.1), split_seed=2)
    assert [other.val[i]["input_ids"].tolist() for i in range(10)] != [splits.val[i]["input_ids"].tolist() for i in range(10)]


def test_tsv_truncation_and_collate(tmp_path):
    path = write(tmp_path / "t.tsv", "a very long sentence indeed\t1\nhi\t0\nmid size\t1\nyo\t0\n")
    splits = text.load(f"tsv:{path}", "bytes", seq_len=10, split=(0.5, 0.25, 0.25))
    data = splits.train + splits.val + splits.test
    assert max(len(data[i]["input_ids"]) for i in range(len(data))) == 10
    batch = splits.collate([data[i] for i in range(len(data))])
    lengths = [len(data[i]["input_ids"]) for i in range(len(data))]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 10)
    assert batch["attention_mask"].sum(1).tolist() == lengths and batch["attention_mask"].dtype == torch.int64
    assert (batch["input_ids"][batch["attention_mask"] == 0] == splits.tokenizer.pad_id).all()
    assert batch["labels"].shape == (4,)


# ---- bad input


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^text:.*nope\.txt: no such file"):
        text.load(f"text:{tmp_path / 'nope.txt'}", "bytes")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        text.load(f"tsv:{tmp_path / 'nope.tsv'}", "bytes")
    with pytest.raises(ValueError, match="empty"):
        text.load(f"text:{write(tmp_path / 'empty.txt', '')}", "bytes")


def test_too_short_for_a_block(tmp_path):
    path = lm_text(tmp_path, lines=4)
    with pytest.raises(ValueError, match=r"the val part holds \d+ tokens, fewer than one block of seq_len=64; lower --seq-len"):
        text.load(f"text:{path}", "bytes", seq_len=64, cache_dir=tmp_path / "cache")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown text dataset 'cifar10'; use text:PATH"):
        text.load("cifar10", "bytes")
    with pytest.raises(ValueError, match="seq_len must be an integer of at least 2"):
        text.load(f"text:{lm_text(tmp_path)}", "bytes", seq_len=1)


@pytest.mark.parametrize("content, line, what", [
    ("sentence\tlabel\ngood\t1\nno tab here\nbad\t0\n", 3, "'no tab here'"),  # (the header skipped)
    ("good\t1\nbad\tnegative\n", 2, "'bad\\tnegative'"),
    ("good\t1\nbad\t0\textra\n", 2, "'bad\\t0\\textra'"),
])
def test_bad_tsv_lines(tmp_path, content, line, what):
    path = write(tmp_path / "x.tsv", content)
    with pytest.raises(ValueError) as raised:
        text.load(f"tsv:{path}", "bytes")
    assert str(raised.value) == f"{path}:{line}: expected 'text<TAB>label' with an integer label, got {what}"


def test_tsv_folder_missing_dev(tmp_path):
    write(tmp_path / "train.tsv", "good\t1\n")
    with pytest.raises(FileNotFoundError, match="lacks dev.tsv"):
        text.load(f"tsv:{tmp_path}", "bytes")


def test_non_utf8(tmp_path):
    path = write(tmp_path / "latin1.txt", "caf\u00e9 au lait\n".encode("latin-1") * 3)
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text: byte 3 "):
        text.load(f"text:{path}", "bytes", seq_len=2, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text: byte 3 "):  # met while training a BPE
        text.load(f"text:{path}", "bpe:300", seq_len=2, cache_dir=tmp_path / "cache")
    tsv = write(tmp_path / "latin1.tsv", b"good\t1\ncaf\xe9\t0\n")
    with pytest.raises(ValueError, match=r"latin1\.tsv:2: not UTF-8 text: byte 10 "):
        text.load(f"tsv:{tsv}", "bytes")


# ---- loaders


def test_dataloaders_yield_the_documented_batches(tmp_path, bpe):
    lm = text.load(f"text:{text.TINY_TEXT}", "bytes", seq_len=32, cache_dir=tmp_path)
    batch = next(iter(DataLoader(lm.train, batch_size=8, shuffle=True, collate_fn=lm.collate)))
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 32) and batch["input_ids"].dtype == torch.int64
    cls = text.load(f"tsv:{text.TINY_SST2}", bpe, seq_len=16)
    batch = next(iter(DataLoader(cls.train, batch_size=8, shuffle=True, collate_fn=cls.collate)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 16 and batch["labels"].shape == (8,)


def test_datasets_and_collates_pickle(tmp_path, bpe):
    # what DataLoader workers receive: the token file's path, not its tokens
    lm = text.load(f"text:{text.TINY_TEXT}", "bytes", seq_len=32, cache_dir=tmp_path)
    lm.train[0]  # maps the file
    blocks = pickle.loads(pickle.dumps(lm.train))
    assert blocks._tokens is None and torch.equal(blocks[5]["input_ids"], lm.train[5]["input_ids"])
    cls = text.load(f"tsv:{text.TINY_SST2}", bpe, seq_len=16)
    collate = pickle.loads(pickle.dumps(cls.collate))
    assert torch.equal(collate([cls.val[0]])["input_ids"], cls.collate([cls.val[0]])["input_ids"])
    assert pickle.loads(pickle.dumps(lm.collate)) is lm.collate
    assert pickle.loads(pickle.dumps(bpe)).encode(SAMPLE) == bpe.encode(SAMPLE)


def test_token_blocks_from_an_array():
    blocks = text.TokenBlocks(np.arange(50, dtype=np.uint16), 8)
    assert len(blocks) == 6 and blocks[-1]["input_ids"].tolist() == list(range(40, 48))
    with pytest.raises(IndexError):
        blocks[6]
