"""Train flow: Ray Train DDP on ingested shards, with epoch progress and a metrics artifact."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from featx.train import TrainConfig
from flows.tasks import train_task


@flow(name="featx-train", log_prints=True)
def train_flow(config: TrainConfig) -> dict:
    """Train `config.model` on `config.dataset` into `config.out` (see `featx train --help`)."""
    result = train_task(config)
    train_artifacts(result)
    print(f"best model: {result['best_dir']}")
    return result


def train_artifacts(r: dict) -> None:
    create_table_artifact(
        key="featx-train-metrics",
        table=[
            {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
            for m in r["metrics"]
        ],
        description="Metrics per epoch",
    )
    create_markdown_artifact(
        key="featx-train",
        markdown=(
            f"# Training: {len(r['metrics'])} epochs\n\n"
            f"- best val loss: {r['best_val_loss']}\n"
            + (
                f"- best val accuracy: {r['best_val_accuracy']}\n"
                if r["best_val_accuracy"] is not None
                else "".join(  # a contrastive run: its label-free monitors
                    f"- {k.replace('_', ' ')} (last epoch): {r['metrics'][-1][k]:.4f}\n"
                    for k in ("alignment", "uniformity", "effective_rank", "knn_accuracy")
                    if r["metrics"] and k in r["metrics"][-1]
                )
            )
            + f"- best model directory: `{r['best_dir']}`\n"
            f"- training curves: `{r['run_dir']}/curves.png`\n"
            f"- metrics: `{r['run_dir']}/metrics.csv`\n"
        ),
        description="Training summary",
    )
