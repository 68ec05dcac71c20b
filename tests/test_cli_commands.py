"""The command tree (by method), `--help` of every command, `--config` files and recipes, the old names.

Real invocations where cheap: data, models list, eval and export-lm-eval on a tiny model, finetune for 2
steps on a tiny base via --config; the gate commands and profile run in test_mambaformer_cli.py,
distill in test_mamba_distill_cli.py, the expert preset in test_train_expert.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.cli.config_file import read_config
from tiny_lm import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def click_tree():
    return typer.main.get_command(app)


def walk(group, path=()):
    """(path, command) for every command and group under `group`, hidden ones included."""
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from walk(command, (*path, name))


def visible(group) -> list[str]:
    return [name for name, command in group.commands.items() if not command.hidden]


ALL_COMMANDS = [path for path, _ in walk(click_tree())]


# ---- the tree ---------------------------------------------------------------------------------

def test_the_command_tree_is_by_method():
    top = click_tree()
    assert set(visible(top)) == {"run", "ask", "finetune", "eval", "export", "export-lm-eval", "serve", "data", "models", "mambaformer", "loramoe", "heads"}
    mambaformer, loramoe = top.commands["mambaformer"], top.commands["loramoe"]
    assert visible(mambaformer) == ["run", "ask", "distill", "distill-task", "expert", "profile", "calibrate", "gate"]
    assert visible(mambaformer.commands["gate"]) == ["lexicon", "train", "calibrate", "pareto"]
    assert visible(loramoe) == ["finetune", "routing"]
    hidden = {name for name, command in top.commands.items() if command.hidden}
    assert hidden == {"router", "train", "distill", "profile", "calibrate", "routing"}


def test_top_level_run_ask_finetune_are_the_groups_commands():
    top = click_tree()
    for name, group in (("run", "mambaformer"), ("ask", "mambaformer"), ("finetune", "loramoe")):
        assert top.commands[name].callback.__wrapped__ is top.commands[group].commands[name].callback.__wrapped__


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=" ".join)
def test_help_of_every_command(path):
    result = runner.invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command = click_tree()
    for name in path:
        command = command.commands[name]
    if not command.hidden:
        assert "Example: medmoe " in result.output, f"`medmoe {' '.join(path)} --help` shows no example"


def test_one_flag_vocabulary():
    """--model, --data, --output/-o wherever a command takes a model, data or an output folder; --router is a
    gate checkpoint folder everywhere (finetune's LoRA-MoE router kind is --loramoe-router)."""
    old = {"--base", "--source", "--teacher", "--dataset", "--datasets", "--out", "--gate-holdout"}
    for path, command in walk(click_tree()):
        if command.hidden or hasattr(command, "commands"):
            continue
        flags = {opt for param in command.params for opt in param.opts}
        assert not flags & old, (path, flags & old)
        if "--output" in flags:
            assert "-o" in flags, path
    finetune = {opt for param in click_tree().commands["finetune"].params for opt in param.opts}
    assert "--router" not in finetune and "--loramoe-router" in finetune


# ---- cheap real invocations -------------------------------------------------------------------

def test_data_commands(tmp_path):
    listed = runner.invoke(app, ["data", "list"], terminal_width=200)
    assert listed.exit_code == 0 and "pubmedqa" in listed.output
    shown = runner.invoke(app, ["data", "show", "dental", "--split", "train", "-n", "1"])
    assert shown.exit_code == 0 and '"question"' in shown.output
    stats = runner.invoke(app, ["data", "stats", "dental"], terminal_width=200)
    assert stats.exit_code == 0 and "train" in stats.output
    good = tmp_path / "qa.jsonl"
    good.write_text(json.dumps({"id": "q1", "question": "Which?", "options": ["a", "b"], "answer": "A"}) + "\n")
    valid = runner.invoke(app, ["data", "validate", str(good)])
    assert valid.exit_code == 0 and "1 valid records" in valid.output


def test_models_list():
    result = runner.invoke(app, ["models", "list"], terminal_width=200)
    assert result.exit_code == 0 and "smollm2" in result.output and "gemma3" in result.output


@pytest.fixture()
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_models_info_on_a_local_folder(tiny_folder):
    result = runner.invoke(app, ["models", "info", str(tiny_folder)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "llama" in result.output.lower()


def test_eval_and_export_on_a_tiny_model(tmp_path, tiny_folder):
    result = runner.invoke(app, ["eval", "--model", str(tiny_folder), "--benchmarks", "dental", "--limit", "2",
                                 "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["benchmarks"]["dental"]["examples"] == 2
    result = runner.invoke(app, ["export-lm-eval", "dental", "--model", str(tiny_folder), "--limit", "3", "-o", str(tmp_path / "task")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "task").glob("*.yaml"))


def test_ask_refuses_an_empty_question():
    result = runner.invoke(app, ["ask", "  "])
    assert result.exit_code != 0 and "the question is empty" in str(result.exception)


# ---- --config -----------------------------------------------------------------------------------

@pytest.fixture()
def tiny_base(tmp_path):
    from loramoe_tiny_models import arithmetic_examples
    from test_loramoe_cli import _save_tiny_base

    _save_tiny_base(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"question": ex.prompt.split("Question: ")[1].split("\n")[0], "answer": ex.completion.strip()})
                              for ex in arithmetic_examples(16)) + "\n")
    return tmp_path / "base", data


def test_finetune_from_a_config_file_with_a_flag_overriding_it(tmp_path, tiny_base):
    base, data = tiny_base
    config = tmp_path / "ft.yaml"
    config.write_text(f"model: {base}\ndata: {data}\noutput: {tmp_path / 'run'}\nsteps: 5\nbatch-size: 2\n"
                      "lr: 1.0e-2\nexperts: 4\nrank: 2\neval_examples: 0\nsave-every: 1\nresume: true\n")
    result = runner.invoke(app, ["loramoe", "finetune", "--config", str(config), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "done: step 2" in result.output
    saved = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert saved["steps"] == 2 and saved["batch_size"] == 2 and saved["lr"] == pytest.approx(0.01)  # flag > file > default
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["num_experts"] == 4


def test_config_errors_name_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: pubmedqa\nbatch-sise: 8\n")
    result = runner.invoke(app, ["finetune", "--config", str(bad)], terminal_width=300)
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "unknown key 'batch-sise'" in result.output and "batch-size" in result.output
    listed = tmp_path / "list.yaml"
    listed.write_text("- steps\n")
    result = runner.invoke(app, ["mambaformer", "distill", "--config", str(listed)], terminal_width=300)
    assert result.exit_code == 2 and "expected a mapping" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1\n")
    result = runner.invoke(app, ["run", "--config", str(broken)], terminal_width=300)
    assert result.exit_code == 2 and "not valid YAML" in result.output and "broken.yaml" in result.output


def test_a_required_option_may_come_from_the_file(tmp_path):
    config = tmp_path / "d.yaml"
    config.write_text(f"output: {tmp_path / 'o'}\nsize: huge\n")
    result = runner.invoke(app, ["mambaformer", "distill", "--config", str(config)])
    assert result.exit_code != 0
    assert "--size must be one of" in str(result.exception)  # --output was given by the file: the command ran


RECIPE_COMMANDS = {"finetune": ("finetune",), "run": ("run",), "distill": ("mambaformer", "distill"),
                   "expert": ("mambaformer", "expert")}


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_for_its_command(recipe):
    command = click_tree()
    for name in RECIPE_COMMANDS[recipe.name.split("_")[0]]:
        command = command.commands[name]
    values = read_config(recipe, command)
    assert values and all(name in {p.name for p in command.params} for name in values)


# ---- old names: hidden, working, with a notice -------------------------------------------------

def test_old_command_names_print_the_new_one(tmp_path):
    result = runner.invoke(app, ["distill", "--out", str(tmp_path), "--size", "huge"])
    assert "`medmoe distill` is now `medmoe mambaformer distill`" in result.output
    assert "--out is now --output" in result.output
    assert "--size must be one of" in str(result.exception)  # and the command itself ran

    result = runner.invoke(app, ["routing", "--adapter", str(tmp_path), "--out", str(tmp_path / "r")])
    assert "`medmoe routing` is now `medmoe loramoe routing`" in result.output
    assert "no loramoe_config.json" in str(result.exception)

    result = runner.invoke(app, ["calibrate", "--router", str(tmp_path / "none"), "--latency-budget", "1"])
    assert "`medmoe calibrate` is now `medmoe mambaformer calibrate`" in result.output and result.exit_code != 0

    result = runner.invoke(app, ["router", "lexicon", "--dataset", "dental", "--out", str(tmp_path / "lex.json")])
    assert result.exit_code == 0, result.output
    assert "`medmoe router` is now `medmoe mambaformer gate`" in result.output and (tmp_path / "lex.json").is_file()


def test_old_train_expert_and_finetune_flags(tmp_path, tiny_folder):
    result = runner.invoke(app, ["train", "expert", "--source", str(tiny_folder), "--dataset", "pubmedqa",
                                 "-o", str(tmp_path / "r"), "--gate-holdout", "100000"])
    assert "`medmoe train expert` is now `medmoe mambaformer expert`" in result.output
    assert "--gate-holdout is now --skip-first" in result.output and "--source is now --model" in result.output
    assert "leaves none" in str(result.exception)

    result = runner.invoke(app, ["finetune", "--base", str(tiny_folder), "--data", "pubmedqa", "--router", "linear",
                                 "--method", "qlora"])
    assert "--router is now --loramoe-router" in result.output and "--base is now --model" in result.output
    assert "--method must be one of" in str(result.exception)


# ---- every command line of the README and docs names a command and its flags -------------------

def documented_command_lines():
    """`medmoe ...` lines (backslash continuations joined) from README.md and docs/*.md, comments cut."""
    import shlex

    lines = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8").replace("\\\n", " ")
        fenced = False
        for raw in text.splitlines():
            fenced ^= raw.lstrip().startswith("```")
            line = raw.strip()
            in_code = fenced or raw.startswith("    ")
            if not in_code or not line.startswith("medmoe ") or "..." in line:
                continue
            words = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
            lines.append((f"{doc.name}: {line.split('  #')[0].strip()[:70]}", words[1:]))
    return lines


@pytest.mark.parametrize("words", [w for _, w in documented_command_lines()], ids=[i for i, _ in documented_command_lines()])
def test_every_documented_command_line_names_a_command_and_its_flags(words):
    command = click_tree()
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command, words = command.commands[words[0]], words[1:]
    assert not hasattr(command, "commands") or words == ["--help"], f"no such command: {words}"
    assert not command.hidden, "the docs show an old (deprecated) name"
    flags = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    unknown = [w.split("=")[0] for w in words if w.startswith("-") and w.split("=")[0] not in flags]
    assert not unknown, f"unknown flags {unknown}"
