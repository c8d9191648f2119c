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
    cache = StatRowCache()
    params = {"num_clusters": 2, "batch_size": 8, "init_size": 8}
    for seed in (0, 1):
        a = _select(model, text_pool, "selectq", params, seed, 6, None)
        b = _select(model, text_pool, "selectq", params, seed, 6, cache)
        assert torch.equal(a, b)
