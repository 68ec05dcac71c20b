"""Routing analytics: load shares per layer and group, specialisation, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

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


def test_record_groups_by_dataset_and_subject():
    from medmoe.data.record import Record
    from medmoe.loramoe.analytics import record_groups

    a = [Record(f"x/{i}", f"q{i}", "A", options=("yes", "no"), metadata={"subject": "anatomy" if i % 2 else "virology"}) for i in range(5)]
    b = [Record("y/0", "question", "B", context="ctx", options=("u", "v"))]
    by_dataset = record_groups({"first": a, "second": b}, "dataset", per_group=2)
    assert by_dataset == {"first": ["q0 A. yes B. no", "q1 A. yes B. no"], "second": ["question A. u B. v ctx"]}
    by_subject = record_groups({"first": a}, "subject")
    assert {k: len(v) for k, v in by_subject.items()} == {"anatomy": 2, "virology": 3}
    with pytest.raises(ValueError, match="y/0 has no metadata field 'subject'"):
        record_groups({"second": b}, "subject")


def test_routing_command_rejects_a_folder_without_a_loramoe_adapter(tmp_path):
    from typer.testing import CliRunner

    from medmoe.cli import app

    result = CliRunner().invoke(app, ["loramoe", "routing", "--adapter", str(tmp_path), "--output", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "no loramoe_config.json" in str(result.exception)


@pytest.mark.real_model
def test_routing_command_on_smollm2_writes_plot_and_shares(tmp_path):
    from typer.testing import CliRunner

    from medmoe.cli import app
    from medmoe.models import load_causal_lm

    model, _ = load_causal_lm("smollm2-135m")
    LoraMoeModel(model, LoraMoeConfig(num_experts=4, top_k=2, rank=4)).save_adapter(tmp_path / "adapter")
    out = tmp_path / "routing"
    result = CliRunner().invoke(app, ["loramoe", "routing", "--adapter", str(tmp_path / "adapter"), "--data", "pubmedqa,dental",
                                      "--per-group", "2", "--max-length", "32", "--output", str(out)])
    assert result.exit_code == 0, result.output
    shares = json.loads(out.with_suffix(".json").read_text())
    assert shares["groups"] == ["dental", "pubmedqa"]
    assert np.allclose(np.asarray(shares["load"]).sum(-1), 1.0, atol=1e-4)
    assert out.with_suffix(".png").stat().st_size > 1000
