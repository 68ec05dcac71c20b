"""`medmoe mambaformer gate lexicon | train | calibrate | pareto`: the MambaFormer gate on your own result files.

`medmoe run` does the whole job on the bundled experts (medmoe.mambaformer.experiments.pipeline); these commands do its
gate steps on any per-example expert results (`ExpertResults` JSONL, one example per line) whose
ids come from a bundled dataset split, without running the experts. `medmoe mambaformer profile`
(cli/mambaformer) writes the latency models that `gate train --transformer-latency/--mamba-latency` read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import typer
from rich.console import Console
from rich.table import Table

from medmoe.cli.deprecated import renamed_flags

console = Console()
gate_app = typer.Typer(
    help="The MambaFormer gate on cached expert results (ExpertResults JSONL): lexicon, training, calibration, "
         "Pareto sweep.\n\nExample: medmoe mambaformer gate train --train-results train.jsonl --dev-results dev.jsonl",
    no_args_is_help=True)
LEXICON_FLAGS = {"--dataset": "--data", "--out": "--output"}  # old -> new (medmoe.cli.deprecated)
TRAIN_FLAGS = {"--dataset": "--data", "--out": "--output"}
CALIBRATE_FLAGS = {"--dataset": "--data"}
PARETO_FLAGS = {"--dataset": "--data", "--out": "--output"}
DATA_HELP = "Bundled dataset the result ids come from."


def _latency_models(transformer: Path | None, mamba: Path | None):
    if transformer is None and mamba is None:
        return None
    if transformer is None or mamba is None:
        raise typer.BadParameter("give both --transformer-latency and --mamba-latency, or neither")
    from medmoe.mambaformer.latency import LatencyModel

    return {"transformer": LatencyModel.load(transformer), "mamba": LatencyModel.load(mamba)}


@gate_app.command("lexicon", cls=renamed_flags(LEXICON_FLAGS))
def lexicon(
    data: list[str] = typer.Option(["pubmedqa", "dental"], "--data", help="Datasets whose train split feeds the lexicon (repeat the flag)."),
    output: Path = typer.Option(Path("lexicon.json"), "--output", "-o", help="Where to write the lexicon (JSON)."),
) -> None:
    """Build the medical lexicon (MeSH words + clinical/dental terms) from training splits only.

    Example: medmoe mambaformer gate lexicon --data pubmedqa --data dental -o lexicon.json
    """
    from medmoe.data import load_dataset
    from medmoe.mambaformer.lexicon import build_lexicon

    records = [r for name in data for r in load_dataset(name, "train")]
    lex = build_lexicon(records)
    lex.save(output)
    console.print(f"[green]lexicon[/]: {len(lex)} terms from {len(records)} training records -> {output}")


@gate_app.command("train", cls=renamed_flags(TRAIN_FLAGS))
def train_gate(
    train_results: Path = typer.Option(..., help="ExpertResults JSONL of the training split."),
    dev_results: Path = typer.Option(..., help="ExpertResults JSONL of the dev split (for tau)."),
    data: str = typer.Option("pubmedqa", "--data", help=DATA_HELP),
    model: str = typer.Option("smollm2-135m", help="The Transformer expert E_T: its tokenizer and embedding table feed the gate."),
    mamba: str | None = typer.Option(None, help="The Mamba expert E_M the results came from (a folder), named in the checkpoint so it can be asked, served and evaluated."),
    output: Path = typer.Option(Path("runs/router"), "--output", "-o", help="Checkpoint folder."),
    transformer_latency: Path | None = typer.Option(None, help="E_T's latency model (`medmoe mambaformer profile ... --output`); with --mamba-latency the costs C_e(n) (default: measured latencies)."),
    mamba_latency: Path | None = typer.Option(None, help="E_M's latency model (`medmoe mambaformer profile ... --output`)."),
    lexicon_path: Path | None = typer.Option(None, "--lexicon", help="Lexicon JSON (default: build from the dataset's train split)."),
    latency_budget: float | None = typer.Option(None, help="Latency budget in ms: dual ascent on lambda_cost and calibration of tau."),
    statistic: str = typer.Option("p50", help="Latency statistic for the budget: p50, mean or p95."),
    beta: float = typer.Option(1.0, help="Cost weight beta in the utility U_e = -l_e - beta C_e / C_ref."),
    lambda_cost: float = typer.Option(0.1), lambda_util: float = typer.Option(0.5),
    lambda_bal: float = typer.Option(0.0), lambda_ent: float = typer.Option(0.0), lambda_reg: float = typer.Option(1e-4),
    balance: str = typer.Option("target", help="Balance loss: switch or target."),
    target_mix: float = typer.Option(0.5, help="rho, the target share to E_M for balance=target."),
    epochs: int = typer.Option(100), mode: str = typer.Option("st", help="Training decisions: st or soft."),
    max_length: int = typer.Option(4096, help="Gate tokens per query at most."),
    seed: int = typer.Option(0),
) -> None:
    """Train the gate on cached expert results (experts frozen), calibrate tau on dev, save the checkpoint.

    Example: medmoe mambaformer gate train --train-results train.jsonl --dev-results dev.jsonl --latency-budget 400 -o runs/router
    """
    from medmoe.data import load_dataset
    from medmoe.mambaformer.fit import train_router
    from medmoe.mambaformer.loss import LossConfig
    from medmoe.mambaformer.results import ExpertResults
    from medmoe.mambaformer.train import TrainConfig

    train_table, dev_table = ExpertResults.load_jsonl(train_results), ExpertResults.load_jsonl(dev_results)
    loss_config = LossConfig(cost=lambda_cost, util=lambda_util, bal=lambda_bal, ent=lambda_ent, reg=lambda_reg,
                             beta=beta, balance=balance, target_mix=target_mix)
    train_config = TrainConfig(epochs=epochs, mode=mode, seed=seed, latency_budget_ms=latency_budget)
    with console.status("training the gate..."):
        ckpt, fitted = train_router(
            train_table, dev_table, load_dataset(data, "train"), load_dataset(data, "dev"), output, model, mamba,
            loss_config=loss_config, train_config=train_config,
            latency_models=_latency_models(transformer_latency, mamba_latency), lexicon_path=lexicon_path,
            budget_ms=latency_budget, statistic=statistic, max_tokens=max_length, info={"dataset": data})
    (output / "history.json").write_text(json.dumps(fitted.history, indent=1) + "\n", encoding="utf-8")
    _print_metrics(f"gate on {data} dev (tau = {ckpt.tau:.4f}, gate {ckpt.gate_ms or 0:.2f} ms)", fitted.dev_metrics)
    console.print(f"checkpoint: {output}")


@gate_app.command("calibrate", cls=renamed_flags(CALIBRATE_FLAGS))
def calibrate(
    router: Path = typer.Option(..., help="Gate checkpoint folder (from `medmoe mambaformer gate train`)."),
    dev_results: Path = typer.Option(..., help="ExpertResults JSONL of the dev split."),
    latency_budget: float = typer.Option(..., help="Latency budget per query in ms."),
    data: str = typer.Option("pubmedqa", "--data", help=DATA_HELP), split: str = typer.Option("dev"),
    statistic: str = typer.Option("p50", help="p50, mean or p95."),
) -> None:
    """Pick tau so the routed dev latency statistic meets the budget with the best accuracy; saves it.

    Example: medmoe mambaformer gate calibrate --router runs/router --dev-results dev.jsonl --latency-budget 300
    """
    from medmoe.data import load_dataset
    from medmoe.mambaformer.fit import recalibrate
    from medmoe.mambaformer.results import ExpertResults

    cal = recalibrate(router, ExpertResults.load_jsonl(dev_results), load_dataset(data, split), latency_budget, statistic)
    _print_metrics(f"calibrated tau = {cal.tau:.4f} for {statistic} <= {latency_budget:g} ms", cal.metrics.to_dict())


@gate_app.command("pareto", cls=renamed_flags(PARETO_FLAGS))
def pareto(
    router: list[Path] = typer.Option(..., help="Gate checkpoint folder(s); one per beta for the beta sweep (repeat the flag)."),
    results: Path = typer.Option(..., help="ExpertResults JSONL of the evaluation split."),
    dev_results: Path | None = typer.Option(None, help="Dev ExpertResults JSONL (fits the length threshold)."),
    data: str = typer.Option("pubmedqa", "--data", help=DATA_HELP), split: str = typer.Option("test"),
    output: Path = typer.Option(Path("runs/pareto"), "--output", "-o", help="Folder for pareto.md, pareto.json, pareto.png."),
    statistic: str = typer.Option("p50", help="Latency axis: p50, mean or p95."),
    seed: int = typer.Option(0),
) -> None:
    """Sweep tau (and beta over several checkpoints): accuracy vs latency, Pareto front, APGR, baselines.

    Example: medmoe mambaformer gate pareto --router runs/router-beta0.5 --router runs/router-beta1 --results test.jsonl -o runs/pareto
    """
    from medmoe.data import load_dataset
    from medmoe.mambaformer.checkpoint import RouterCheckpoint
    from medmoe.mambaformer.experiments.pareto import pareto_run, write_report
    from medmoe.mambaformer.queries import query_features, records_for
    from medmoe.mambaformer.results import ExpertResults
    from medmoe.mambaformer.train import gate_scores
    from medmoe.models import load_tokenizer

    table = ExpertResults.load_jsonl(results)
    dev = ExpertResults.load_jsonl(dev_results) if dev_results else None
    scores_by_beta: dict[float, Any] = {}
    tau: float | None = None
    first_beta: float | None = None
    gate_ms = 0.0
    records = records_for(table.ids, load_dataset(data, split), f"{data} {split}")
    for folder in router:
        ckpt = RouterCheckpoint.load(folder)
        tokenizer = load_tokenizer(ckpt.experts.get("transformer") or "smollm2-135m")
        beta = float(ckpt.info.get("loss_config", {}).get("beta", len(scores_by_beta)))
        scores_by_beta[beta] = gate_scores(ckpt.gate, query_features(ckpt.featurizer, tokenizer, records))
        if tau is None:
            tau, first_beta, gate_ms = ckpt.tau, beta, ckpt.gate_ms or 0.0
    # --router is required (one folder at least), so tau and first_beta are set
    report = pareto_run(table, scores_by_beta, cast(float, tau), dev, seed=seed, gate_ms=gate_ms, statistic=statistic,
                        oracle_beta=cast(float, first_beta))
    paths = write_report(report, output, "pareto", statistic,
                         header=f"# Pareto sweep on {data} {split} ({len(table)} examples)\n")
    console.print(Path(paths["md"]).read_text(encoding="utf-8"))
    console.print(f"written: {', '.join(str(p) for p in paths.values())}")


def _print_metrics(title: str, metrics: dict) -> None:
    table = Table("metric", "value", title=title)
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)

