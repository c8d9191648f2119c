"""StatRowCache: selectors sharing one model's statistic rows select exactly what they
select without it, and each pool sample is forwarded once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcalib.config import CalibConfig, RunConfig, SelectConfig
from qcalib.data.pool import Pool
from qcalib.data.registry import load_pool
from qcalib.pipeline import Workbench, select_indices
from qcalib.select import SELECTORS
from qcalib.select.stats import StatRowCache
from test_selectq import small_net


class CountingNet(nn.Module):
    """Counts the samples of every forward (probe forwards of one sample included)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net(in_ch=1)  # digits: one channel
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += x.shape[0]
        return self.net(x)


@pytest.fixture(scope="module")
def pool() -> Pool:
    full = load_pool("digits")
    return Pool(torch.utils.data.Subset(full.dataset, range(300)), name="digits[300]")


CASES = [
    ("selectq", {"num_clusters": 4, "batch_size": 64, "init_size": 64}),
    ("selectq", {"num_clusters": 4, "batch_size": 64, "init_size": 64, "within": "matched"}),
    ("herding", {"batch_size": 64}),
    ("kcenter", {"batch_size": 64}),
]


def _select(model, pool, name, params, seed, n, cache):  # noqa: ANN001, ANN202
    sel = SELECTORS.get(name)(seed=seed, **params)
    sel.row_cache = cache
    sel.fit(pool, model=model, calibrator_reads="range")
    return sel.select(n)


def test_cached_selections_equal_uncached_ones_and_forward_each_sample_once(pool):
    plain, cached = CountingNet(), CountingNet()
    cache = StatRowCache()
    runs = 0
    for name, params in CASES:
        for seed in (0, 1):
            for n in (8, 24):
                a = _select(plain, pool, name, params, seed, n, None)
                b = _select(cached, pool, name, params, seed, n, cache)
                assert torch.equal(a, b), (name, params, seed, n)
                runs += 1
    # Without the cache every selection reads the pool (SelectQ twice); with it the rows
    # of each sample are computed once per layer spec (SelectQ: all layers; herding and
    # k-center share the deepest layer), plus one-sample probe forwards.
    assert plain.samples >= runs * len(pool)
    assert cached.samples <= 2 * len(pool) + 4 * runs


def test_workbench_cache_is_used_by_the_pipeline(pool):
    model = CountingNet()
    bench = Workbench(model, pool)
    bench.stat_rows = StatRowCache()
    sel = SelectConfig("selectq", (("batch_size", 64), ("init_size", 64), ("num_clusters", 4)))
    for seed in (0, 1, 2):
        cfg = RunConfig(calib=CalibConfig(num_calib=16), select=sel, seed=seed)
        select_indices(cfg, bench, progress=False)
    assert model.samples <= len(pool) + 12


def test_token_pool_cached_selection_equals_uncached(tmp_path):
    from qcalib.config import TextConfig
    from qcalib.data.text import load_text_pool
    from test_text import write_lines
    from text_models import sentences, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(bos=True)
    model = tiny_llama(tok)
    path = write_lines(tmp_path / "d.txt", sentences(40, seed=2))
    text_pool = load_text_pool(path, tok, TextConfig(seq_len=8, mode="doc", eval_fraction=0.0))
    embed = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    counted: list[int] = []
    embed.register_forward_pre_hook(lambda _m, a: counted.append(a[0].shape[0]))
    cache = StatRowCache()
    params = {"num_clusters": 2, "batch_size": 8, "init_size": 8}
    uncached = cached = 0
    for seed in (0, 1):
        counted.clear()
        a = _select(model, text_pool, "selectq", params, seed, 6, None)
        uncached += sum(counted)
        counted.clear()
        b = _select(model, text_pool, "selectq", params, seed, 6, cache)
        cached += sum(counted)
        assert torch.equal(a, b)
    # Uncached: two passes per selection; cached: the pool once (plus one-sample probes).
    assert uncached >= 4 * len(text_pool)
    assert len(text_pool) <= cached <= len(text_pool) + 4


def test_rows_on_disk_serve_a_new_process_and_survive_a_crashed_pass(pool, tmp_path):
    """A cache on a directory writes each new batch of rows as it goes; a later cache on
    the same directory (a rerun) reads them back, forwards nothing more and selects the
    same set; a pass that crashed part-way forwards only the samples it had not done."""
    params = {"num_clusters": 4, "batch_size": 64, "init_size": 64}
    torch.manual_seed(0)
    first = CountingNet()
    net_state = first.state_dict()
    reference = CountingNet()
    reference.load_state_dict(net_state)
    plain = _select(reference, pool, "selectq", params, 0, 16, None)
    a = _select(first, pool, "selectq", params, 0, 16, StatRowCache(tmp_path, "digits-net"))
    assert torch.equal(a, plain)
    rerun = CountingNet()
    rerun.load_state_dict(net_state)
    b = _select(rerun, pool, "selectq", params, 0, 16, StatRowCache(tmp_path, "digits-net"))
    assert torch.equal(b, plain)
    assert rerun.samples <= 4  # probe forwards of one sample only

    # A crash after the first two batches of the cluster pass: those chunks stay.
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    chunks = sorted(folder.glob("rows-*.safetensors"))
    assert sum(int(c.stem.split("-")[2]) for c in chunks) == len(pool)
    for c in chunks[2:]:
        c.unlink()
    resumed = CountingNet()
    resumed.load_state_dict(net_state)
    c = _select(resumed, pool, "selectq", params, 0, 16, StatRowCache(tmp_path, "digits-net"))
    assert torch.equal(c, plain)
    assert len(pool) - 2 * 64 <= resumed.samples <= len(pool) - 2 * 64 + 4


def test_rows_on_disk_are_keyed_by_fingerprint_and_a_damaged_chunk_is_recomputed(pool, tmp_path):
    params = {"batch_size": 64}
    torch.manual_seed(0)
    net = CountingNet()
    _select(net, pool, "herding", params, 0, 8, StatRowCache(tmp_path, "model-a"))
    other = CountingNet()
    other.load_state_dict(net.state_dict())
    # Another fingerprint (another model or pool) never reads model-a's rows.
    _select(other, pool, "herding", params, 0, 8, StatRowCache(tmp_path, "model-b"))
    assert other.samples >= len(pool)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2

    folder = next(
        p for p in tmp_path.iterdir() if (p / "rows.json").read_text().find("model-a") >= 0
    )
    chunk = sorted(folder.glob("rows-*.safetensors"))[0]
    chunk.write_bytes(b"not a safetensors file")
    again = CountingNet()
    again.load_state_dict(net.state_dict())
    want = _select(net, pool, "herding", params, 1, 8, None)
    got = _select(again, pool, "herding", params, 1, 8, StatRowCache(tmp_path, "model-a"))
    assert torch.equal(got, want)
    assert 64 <= again.samples <= 64 + 4  # only the damaged chunk's samples


def test_a_rows_folder_of_another_key_or_damaged_is_named(tmp_path):
    from qcalib.errors import QCalibError
    from qcalib.select.stats import _RowStore

    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "rows.json").write_text('{"key": "something else", "sites": []}')
    with pytest.raises(QCalibError, match="another model, pool or statistics; delete"):
        _RowStore(10, folder, "mine")
    (folder / "rows.json").write_text("{not json")
    with pytest.raises(QCalibError, match="damaged .*delete that folder"):
        _RowStore(10, folder, "mine")


def test_rows_with_extremes_serve_selections_without_them(pool, tmp_path):
    """Range-matched SelectQ keeps the extremes rows too; a later SelectQ without range
    matching (same layers and statistics) reads that store instead of forwarding again,
    in the same process and from disk, and selects what it selects alone."""
    params = {"num_clusters": 4, "batch_size": 64, "init_size": 64}
    torch.manual_seed(0)
    first = CountingNet()
    state = first.state_dict()
    cache = StatRowCache(tmp_path, "digits-net")
    _select(first, pool, "selectq", {**params, "ranges": "median"}, 0, 16, cache)
    reference = CountingNet()
    reference.load_state_dict(state)
    want = _select(reference, pool, "selectq", params, 1, 16, None)
    for c in (cache, StatRowCache(tmp_path, "digits-net")):
        net = CountingNet()
        net.load_state_dict(state)
        assert torch.equal(_select(net, pool, "selectq", params, 1, 16, c), want)
        assert net.samples <= 4  # probe forwards only
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


def test_a_cache_directory_that_cannot_be_written_is_named(pool, tmp_path):
    from qcalib.errors import QCalibError

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    torch.manual_seed(0)
    with pytest.raises(QCalibError, match=r"cannot write .*choose another cache directory"):
        _select(CountingNet(), pool, "herding", {"batch_size": 64}, 0, 8,
                StatRowCache(blocked, "digits-net"))  # fmt: skip
