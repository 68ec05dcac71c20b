"""Routing analytics: load shares per layer and group, specialisation, plots."""

from __future__ import annotations

import numpy as np

from loramoe_tiny_models import CharTokenizer, tiny_model
from medmoe.loramoe import LoraMoeConfig, LoraMoeModel
from medmoe.loramoe.analytics import RoutingProfile, plot_routing, routing_profile


def test_profile_counts_every_real_token_and_plots(tmp_path):
    model, _ = tiny_model("llama")
    wrapped = LoraMoeModel(model, LoraMoeConfig(num_experts=4, top_k=2, rank=4, router_dim=8))
    groups = {"short": ["abc", "hello there"], "long": ["a much longer text " * 3]}
    profile = routing_profile(wrapped, CharTokenizer(), groups, batch_size=2)
    assert profile.tokens == [3 + 11, 57]  # padding of the shorter text excluded
    assert profile.load.shape == (2, len(wrapped.moe_layers()), 4)
    assert np.allclose(profile.load.sum(-1), 1.0)
    assert profile.specialisation().shape == (2, 4)
    assert plot_routing(profile, tmp_path / "routing.png").stat().st_size > 1000


def test_specialisation_hand_case():
    load = np.array([[[0.5, 0.5]], [[0.0, 1.0]]])  # group 0 balanced, group 1 only expert 1
    profile = RoutingProfile(["a", "b"], ["layer"], load, [10, 10])
    # mean shares: expert 0 0.25, expert 1 0.75
    assert np.allclose(profile.specialisation(), [[2.0, 2 / 3], [0.0, 4 / 3]])
    assert np.allclose(profile.overall_load(), [[0.25, 0.75]])
