"""Reference lane: GEARConfig validation (every field, the error names the field)."""
import dataclasses

import pytest

from lowrank_ops.kvcache import GEARConfig


def test_defaults_follow_the_contract():
    cfg = GEARConfig()
    assert (cfg.bits, cfg.group_size, cfg.rank, cfg.outlier_ratio, cfg.buffer_tokens, cfg.power_iters) == (2, 32, 4, 0.02, 64, 2)
    assert (cfg.factor_bits, cfg.lowrank_fit, cfg.clip_search) == (8, "joint", True)
    assert not GEARConfig(bits=4).clip_search and GEARConfig(bits=4, clip_search=True).clip_search
    assert not GEARConfig(clip_search=False).clip_search and cfg.outlier_rule == "farthest"
    assert cfg.outliers_per_vector(128) == 3 and cfg.outliers_per_vector(64) == 1
    assert GEARConfig(outlier_ratio=0.0).outliers_per_vector(128) == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 4


@pytest.mark.parametrize("kwargs, error, field", [
    (dict(bits=3), ValueError, "bits"),
    (dict(bits=8), ValueError, "bits"),
    (dict(bits=2.0), TypeError, "bits"),
    (dict(group_size=24), ValueError, "group_size"),
    (dict(group_size=8), ValueError, "group_size"),
    (dict(group_size=True), TypeError, "group_size"),
    (dict(buffer_tokens=48), ValueError, "buffer_tokens"),  # not a multiple of 32
    (dict(buffer_tokens=16), ValueError, "buffer_tokens"),  # smaller than group_size
    (dict(buffer_tokens=64.0), TypeError, "buffer_tokens"),
    (dict(rank=-1), ValueError, "rank"),
    (dict(rank=65), ValueError, "rank"),  # > buffer_tokens
    (dict(rank=None), TypeError, "rank"),
    (dict(outlier_ratio=-0.01), ValueError, "outlier_ratio"),
    (dict(outlier_ratio=0.2), ValueError, "outlier_ratio"),
    (dict(outlier_ratio="2%"), TypeError, "outlier_ratio"),
    (dict(power_iters=0), ValueError, "power_iters"),
    (dict(power_iters=1.5), TypeError, "power_iters"),
    (dict(factor_bits=4), ValueError, "factor_bits"),
    (dict(factor_bits="int8"), TypeError, "factor_bits"),
    (dict(lowrank_fit="first"), ValueError, "lowrank_fit"),
    (dict(lowrank_fit=1), TypeError, "lowrank_fit"),
    (dict(clip_search=1), TypeError, "clip_search"),
    (dict(outlier_rule="largest"), ValueError, "outlier_rule"),
])
def test_bad_fields_are_refused_by_name(kwargs, error, field):
    with pytest.raises(error, match=field):
        GEARConfig(**kwargs)


def test_valid_corners():
    GEARConfig(bits=4, group_size=128, buffer_tokens=128, rank=0, outlier_ratio=0.0, power_iters=1)
    GEARConfig(bits=2, group_size=16, buffer_tokens=48, rank=48, outlier_ratio=0.1)


@pytest.mark.parametrize("head_dim, match", [(40, "multiple of 16"), (272, "multiple of 16"), (48, "group_size=32"),
                                             (16, "rank=32")])
def test_head_dim_checks(head_dim, match):
    cfg = GEARConfig(rank=32 if head_dim == 16 else 4, group_size=16 if head_dim == 16 else 32)
    with pytest.raises(ValueError, match=match):
        cfg.check_head_dim(head_dim)
    GEARConfig().check_head_dim(128)
