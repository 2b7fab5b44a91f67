"""Tests for jaxstack.data: tokenizers, text sources, packing, token files and the loader."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as RawHFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxstack.data import (
    ByteTokenizer,
    DataLoader,
    HFTokenizer,
    PackedDataset,
    Prefix,
    Tokenizer,
    lm_collate,
    load_tokenizer,
    open_token_memmap,
    pack_documents,
    packed_example,
    read_jsonl,
    read_text_files,
    token_memmap_info,
    write_token_memmap,
)
from jaxstack.data.memmap import sidecar_path

SENTENCES = [
    "the cat sat on the mat",
    "the dog ate the bone",
    "a bird sang in the tree at dawn",
    "émigrés eat crème brûlée 🍮",
]


def _train_bpe(folder, special_tokens):
    """Trains a tiny byte-level BPE on SENTENCES and saves folder/tokenizer.json."""
    tok = RawHFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    return _train_bpe(tmp_path_factory.mktemp("bpe"), ["<pad>", "<s>", "</s>"])


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 259
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    text = "héllo, wörld 🍮"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.pad_id, 104, 105, tok.eos_id]) == "hi"


def test_byte_tokenizer_decode_never_raises_on_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 104]) == "\ufffdh"
    cut = tok.encode("é")[:1]  # first byte of a two-byte character
    assert tok.decode(cut) == "\ufffd"
    assert tok.decode(np.array([104, 400, -1, 105])) == "hi"


def test_hf_tokenizer_round_trip_and_specials(bpe_path):
    tok = load_tokenizer(str(bpe_path.parent))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    raw = RawHFTokenizer.from_file(str(bpe_path))
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert tok.pad_id == raw.token_to_id("<pad>")
    assert tok.bos_id == raw.token_to_id("<s>")
    assert tok.eos_id == raw.token_to_id("</s>")
    for text in SENTENCES + ["unseen words: zebra quokka 42!"]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
        wrapped = tok.encode(text, add_bos=True, add_eos=True)
        assert wrapped == [tok.bos_id, *ids, tok.eos_id]
        assert tok.decode(wrapped) == text
    by_file = load_tokenizer(bpe_path)
    assert by_file.encode(SENTENCES[0]) == tok.encode(SENTENCES[0])


def test_hf_tokenizer_specials_from_config(tmp_path):
    path = _train_bpe(tmp_path, ["<|endoftext|>"])
    tok = HFTokenizer(path)
    eot = RawHFTokenizer.from_file(str(path)).token_to_id("<|endoftext|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, eot, None)
    with pytest.raises(ValueError, match="no bos token"):
        tok.encode("the cat", add_bos=True)
    config = {"bos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot, eot, eot)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    assert HFTokenizer(path).eos_id is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="eos_token='<nope>'"):
        HFTokenizer(path)


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="expected 'byte'"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="not a .json file"):
        load_tokenizer(str(tmp_path / "tokenizer.model"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- packing


def test_pack_documents_rows_and_segments():
    docs = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9], [10]]
    rows, segs = pack_documents(docs, seq_len=3, eos_id=0)
    # stream: 1 2 3 0 | 4 5 0 6 | 7 8 9 0 | 10 0 (partial row dropped; empty doc skipped)
    np.testing.assert_array_equal(rows, [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]])
    np.testing.assert_array_equal(segs, [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1]])
    assert rows.dtype == np.int32 and segs.dtype == np.int32
    rows, _ = pack_documents(docs, seq_len=20, eos_id=0)
    assert rows.shape == (0, 21)


def test_pack_documents_bad_input():
    with pytest.raises(ValueError, match="already contains eos_id=0"):
        pack_documents([[1, 2], [3, 0, 4]], seq_len=2, eos_id=0)
    with pytest.raises(ValueError, match="document 1 must be a 1-D"):
        pack_documents([[1, 2], [[3, 4]]], seq_len=2, eos_id=0)
    with pytest.raises(ValueError, match="outside"):
        pack_documents([[1, -2]], seq_len=2, eos_id=0)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        pack_documents([[1, 2]], seq_len=0, eos_id=0)


def test_packed_example_fields_and_masks():
    ex = packed_example(np.array([4, 5, 0, 6, 7, 0, 8]), eos_id=0)
    np.testing.assert_array_equal(ex["input_ids"], [4, 5, 0, 6, 7, 0])
    np.testing.assert_array_equal(ex["targets"], [5, 0, 6, 7, 0, 8])
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 0, 1, 1, 0])
    assert {k: v.dtype for k, v in ex.items()} == {
        "input_ids": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "loss_mask": np.float32,
    }


def test_packed_dataset_masks_match_documents():
    """Every unmasked (input, target) pair is a consecutive pair of one document's tokens."""
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 50, size=rng.integers(1, 12))) for _ in range(40)]
    ds = PackedDataset.from_token_docs(docs, seq_len=16, eos_id=0)
    with_eos = [tuple(d) + (0,) for d in docs]
    pairs = {(d[i], d[i + 1]) for d in with_eos for i in range(len(d) - 1)}
    for i in range(len(ds)):
        ex = ds[i]
        for t in np.flatnonzero(ex["loss_mask"]):
            assert (ex["input_ids"][t], ex["targets"][t]) in pairs
            assert ex["segment_ids"][t] >= 1
        masked = ex["loss_mask"] == 0
        np.testing.assert_array_equal(masked, ex["input_ids"] == 0)
        starts = np.flatnonzero(ex["positions"] == 0)
        np.testing.assert_array_equal(ex["segment_ids"][starts], np.arange(1, starts.size + 1))


# ----------------------------------------------------------------------------- text sources


def _write_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(SENTENCES):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(SENTENCES)]
    (folder / "corpus.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]))


def test_readers(tmp_path):
    _write_corpus(tmp_path)
    assert list(read_text_files(str(tmp_path / "doc*.txt"))) == SENTENCES
    assert list(read_text_files([tmp_path / "doc1.txt", tmp_path / "doc0.txt"])) == [
        SENTENCES[1],
        SENTENCES[0],
    ]
    assert list(read_jsonl(tmp_path / "corpus.jsonl")) == SENTENCES
    (tmp_path / "other.jsonl").write_text('{"body": "x y"}\n{"body": "z", "text": 1}\n')
    assert list(read_jsonl(str(tmp_path / "other.jsonl"), field="body")) == ["x y", "z"]


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no files"):
        list(read_text_files(str(tmp_path / "*.txt")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_text_files([tmp_path / "nope.txt"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text' \(found \['body'\]\)"):
        list(read_jsonl(bad))
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' is int"):
        list(read_jsonl(bad))
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        list(read_jsonl(bad))


def _assert_same_dataset(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        ea, eb = a[i], b[i]
        assert ea.keys() == eb.keys()
        for k in ea:
            np.testing.assert_array_equal(ea[k], eb[k])
            assert ea[k].dtype == eb[k].dtype


def test_packed_dataset_constructors_agree(tmp_path, bpe_path):
    _write_corpus(tmp_path)
    tok = load_tokenizer(bpe_path)
    ref = PackedDataset.from_token_docs(
        [tok.encode(t) for t in SENTENCES], seq_len=7, eos_id=tok.eos_id
    )
    assert len(ref) == sum(len(tok.encode(t)) + 1 for t in SENTENCES) // 8
    _assert_same_dataset(ref, PackedDataset.from_texts(SENTENCES, tok, seq_len=7))
    files = PackedDataset.from_text_files(str(tmp_path / "doc*.txt"), tok, seq_len=7)
    _assert_same_dataset(ref, files)
    _assert_same_dataset(ref, PackedDataset.from_jsonl(tmp_path / "corpus.jsonl", tok, seq_len=7))
    write_token_memmap(
        (tok.encode(t) for t in SENTENCES),
        tmp_path / "corpus.bin",
        eos_id=tok.eos_id,
        vocab_size=tok.vocab_size,
    )
    mm = PackedDataset.from_memmap(tmp_path / "corpus.bin", seq_len=7)
    assert isinstance(mm.tokens, np.memmap)
    _assert_same_dataset(ref, mm)
    assert not isinstance(mm[0]["input_ids"], np.memmap)
    np.testing.assert_array_equal(mm[-1]["input_ids"], ref[len(ref) - 1]["input_ids"])


def test_packed_dataset_errors(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="corpus has 0 tokens .* needs at least 9"):
        PackedDataset.from_texts([], tok, seq_len=8)
    with pytest.raises(ValueError, match="corpus has 4 tokens .* needs at least 9"):
        PackedDataset.from_texts(["abc"], tok, seq_len=8)
    ds = PackedDataset.from_texts(["abcdefgh"], tok, seq_len=8)
    assert len(ds) == 1
    with pytest.raises(IndexError, match="out of range for 1 examples"):
        ds[1]
    path = _train_bpe(tmp_path, [])
    with pytest.raises(ValueError, match="no eos token; pass eos_id="):
        PackedDataset.from_texts(SENTENCES, HFTokenizer(path), seq_len=4)
    with pytest.raises(ValueError, match="1-D integer array"):
        PackedDataset(np.zeros((2, 8), np.int32), seq_len=4, eos_id=0)


def test_lm_collate():
    ds = PackedDataset.from_texts(SENTENCES, ByteTokenizer(), seq_len=10)
    batch = lm_collate([ds[0], ds[1], ds[2]])
    assert {k: v.shape for k, v in batch.items()} == {k: (3, 10) for k in ds[0]}
    np.testing.assert_array_equal(batch["targets"][1], ds[1]["targets"])
    assert batch["loss_mask"].dtype == np.float32
    with pytest.raises(ValueError, match="no examples"):
        lm_collate([])
    with pytest.raises(ValueError, match="example 1 has fields"):
        lm_collate([ds[0], {"input_ids": ds[1]["input_ids"]}])


# ----------------------------------------------------------------------------- token files


def test_token_memmap_round_trip(tmp_path):
    docs = [[5, 6, 7], [], [300, 1]]
    info = write_token_memmap(docs, tmp_path / "a.bin", eos_id=2, vocab_size=1000)
    assert (info.dtype, info.num_tokens, info.num_documents, info.eos_id) == ("uint16", 7, 2, 2)
    assert token_memmap_info(tmp_path / "a.bin") == info
    mm = open_token_memmap(tmp_path / "a.bin")
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    np.testing.assert_array_equal(mm, [5, 6, 7, 2, 300, 1, 2])
    info = write_token_memmap(docs + [[70000]], tmp_path / "b.bin", eos_id=2, vocab_size=100_000)
    assert info.dtype == "uint32"
    np.testing.assert_array_equal(open_token_memmap(tmp_path / "b.bin")[-2:], [70000, 2])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.bin", "a.bin.json", "b.bin", "b.bin.json"]  # no temporary files left


def test_token_memmap_errors(tmp_path):
    path = tmp_path / "c.bin"
    with pytest.raises(ValueError, match="no non-empty documents"):
        write_token_memmap([[], []], path, eos_id=0, vocab_size=10)
    with pytest.raises(ValueError, match="token id 12 >= vocab_size=10"):
        write_token_memmap([[1], [12]], path, eos_id=0, vocab_size=10)
    with pytest.raises(ValueError, match="eos_id=10"):
        write_token_memmap([[1]], path, eos_id=10, vocab_size=10)
    with pytest.raises(ValueError, match="does not fit dtype uint16"):
        write_token_memmap([[1]], path, eos_id=0, vocab_size=70000, dtype="uint16")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_token_memmap(path)
    write_token_memmap([[1, 2, 3]], path, eos_id=0, vocab_size=10)
    with open(path, "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match="has 10 bytes but its sidecar says 4 uint16 tokens"):
        open_token_memmap(path)
    sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="has no sidecar"):
        open_token_memmap(path)


def test_memmap_dataset_reads_lazily(tmp_path):
    """A 1.6 GB (sparse) token file opens and serves examples without being read whole."""
    path = tmp_path / "big.bin"
    write_token_memmap([[1, 2, 3]], path, eos_id=9, vocab_size=10)
    num_tokens = 800_000_000
    with open(path, "r+b") as f:
        f.truncate(num_tokens * 2)
    meta = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**meta, "num_tokens": num_tokens}))
    ds = PackedDataset.from_memmap(path, seq_len=1023)
    assert len(ds) == num_tokens // 1024
    np.testing.assert_array_equal(ds[0]["input_ids"][:5], [1, 2, 3, 9, 0])
    np.testing.assert_array_equal(ds[len(ds) - 1]["input_ids"], np.zeros(1023))


# ----------------------------------------------------------------------------- loader


def _collect(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_deterministic_and_reshuffles_each_epoch():
    data = list(range(20))
    a = DataLoader(data, batch_size=5, collate_fn=np.array, seed=3)
    b = DataLoader(data, batch_size=5, collate_fn=np.array, seed=3, prefetch=0)
    assert len(a) == 4
    batches = _collect(a, 8)
    for x, y in zip(batches, _collect(b, 8), strict=True):
        np.testing.assert_array_equal(x, y)
    epoch0, epoch1 = np.concatenate(batches[:4]), np.concatenate(batches[4:])
    assert sorted(epoch0) == data and sorted(epoch1) == data
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, data)
    other = np.concatenate(_collect(DataLoader(data, batch_size=5, collate_fn=np.array), 4))
    assert not np.array_equal(epoch0, other)


def test_loader_unshuffled_drop_remainder_and_epochs():
    loader = DataLoader(
        list(range(10)), batch_size=4, collate_fn=np.array, shuffle=False, num_epochs=2
    )
    assert len(loader) == 2
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert list(loader) == []  # all epochs consumed
    assert loader.get_state()["step"] == 4


@pytest.mark.parametrize("taken_at", [1, 3, 4, 6])  # mid-epoch, before/at/after a boundary
def test_loader_state_round_trip(taken_at):
    ds = PackedDataset.from_texts(SENTENCES * 2, ByteTokenizer(), seq_len=8)
    make = lambda: DataLoader(ds, batch_size=6, collate_fn=lm_collate, seed=7)
    loader = make()
    assert len(loader) == len(ds) // 6 == 4
    it = iter(loader)
    for _ in range(taken_at):
        next(it)
    state = json.loads(json.dumps(loader.get_state()))
    assert state["step"] == taken_at
    assert (state["epoch"], state["batch_in_epoch"]) == divmod(taken_at, 4)
    expected = [next(it) for _ in range(5)]
    resumed = make()
    resumed.set_state(state)
    for want, got in zip(expected, _collect(resumed, 5), strict=True):
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_loader_set_state_rewinds_running_iterator():
    loader = DataLoader(list(range(12)), batch_size=3, collate_fn=np.array, seed=1)
    it = iter(loader)
    next(it)
    state = loader.get_state()
    following = [next(it) for _ in range(5)]
    loader.set_state(state)
    for want in following:
        np.testing.assert_array_equal(next(it), want)


def test_loader_set_state_rejects_other_settings():
    data = list(range(12))
    state = DataLoader(data, batch_size=3, collate_fn=np.array, seed=1).get_state()
    with pytest.raises(ValueError, match=r"seed=1 \(this loader has 2\)"):
        DataLoader(data, batch_size=3, collate_fn=np.array, seed=2).set_state(state)
    with pytest.raises(ValueError, match=r"batch_size=3 \(this loader has 6\)"):
        DataLoader(data, batch_size=6, collate_fn=np.array, seed=1).set_state(state)
    loader = DataLoader(data, batch_size=3, collate_fn=np.array, seed=1)
    with pytest.raises(ValueError, match="not a DataLoader state"):
        loader.set_state({"step": 3})
    with pytest.raises(ValueError, match=r"state\['step'\] must be an integer >= 0"):
        loader.set_state({**state, "step": -1})


@pytest.mark.parametrize("shard_count", [2, 4])
def test_loader_shards_partition_global_batch(shard_count):
    data = list(range(40))
    full = DataLoader(data, batch_size=8, collate_fn=np.array, seed=5)
    shards = [
        DataLoader(
            data,
            batch_size=8,
            collate_fn=np.array,
            seed=5,
            shard_index=k,
            shard_count=shard_count,
        )
        for k in range(shard_count)
    ]
    assert all(s.local_batch_size == 8 // shard_count for s in shards)
    steps = 2 * len(full) + 1  # crosses two epoch boundaries
    global_batches = _collect(full, steps)
    shard_batches = [_collect(s, steps) for s in shards]
    for step in range(steps):
        parts = [sb[step] for sb in shard_batches]
        assert all(p.shape == (8 // shard_count,) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), global_batches[step])
        assert len(set(np.concatenate(parts).tolist())) == 8
    assert all(s.get_state() == full.get_state() for s in shards)


def test_loader_resumes_on_different_shard_count():
    data = list(range(24))
    single = DataLoader(data, batch_size=4, collate_fn=np.array, seed=2)
    it = iter(single)
    for _ in range(3):
        next(it)
    state, want = single.get_state(), next(it)
    halves = []
    for k in range(2):
        shard = DataLoader(
            data, batch_size=4, collate_fn=np.array, seed=2, shard_index=k, shard_count=2
        )
        shard.set_state(state)
        halves.append(next(iter(shard)))
    np.testing.assert_array_equal(np.concatenate(halves), want)


def test_loader_errors():
    data = list(range(10))
    kw = {"collate_fn": np.array}
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by shard_count=4"):
        DataLoader(data, batch_size=6, shard_count=4, **kw)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        DataLoader(data, batch_size=0, **kw)
    with pytest.raises(ValueError, match="dataset has 10 examples, fewer than one global batch"):
        DataLoader(data, batch_size=16, **kw)
    with pytest.raises(ValueError, match="shard_index=2 must be < shard_count=2"):
        DataLoader(data, batch_size=4, shard_index=2, shard_count=2, **kw)
    with pytest.raises(ValueError, match="num_epochs must be an integer >= 1"):
        DataLoader(data, batch_size=4, num_epochs=0, **kw)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        DataLoader(data, batch_size=4, seed=2**32, **kw)
    with pytest.raises(TypeError, match="dataset must support len"):
        DataLoader(iter(data), batch_size=4, **kw)
    with pytest.raises(TypeError, match="collate_fn must be callable"):
        DataLoader(data, batch_size=4, collate_fn=None)


def test_prefix_views_the_first_examples():
    head = Prefix(list(range(10)), 4)
    assert len(head) == 4 and list(head) == [0, 1, 2, 3] and head[-1] == 3
    with pytest.raises(IndexError):
        head[4]
    with pytest.raises(ValueError, match="prefix of 11 examples from a dataset of 10"):
        Prefix(list(range(10)), 11)
