"""skin-twin training pipeline as an Airflow 3 DAG (TaskFlow, ``airflow.sdk``). Orchestration only.

ingest -> validate -> augment -> pairs -> train -> select -> evaluate -> track -> register

The tasks are generated from the stage table (:mod:`pipeline.app.table`): each runs its stages
through :func:`pipeline.app.orchestration.run_stage` (the same functions as
``python -m pipeline <stage>`` and ``dvc repro``). Parse time stays cheap: YAML + pydantic for the
config, no torch / pandas / mlflow / Great Expectations.

* Each DAG run works in ``<airflow.runs_dir>/<sanitised run_id>`` (re-runs reuse it, runs never
  share it); only small values (paths, digests, ids) go through XCom.
* Schedule: ``airflow.schedule`` (cron) and/or, with ``airflow.schedule_on_asset``, the raw-data
  Asset ``skin_twin.raw_data`` -- a new data version (an Asset event, e.g. from the data team's DAG
  or ``POST /api/v2/assets/events`` with extras ``data_root``/``data_source``) triggers a retrain.
* Tasks emit Assets for the validated manifest, the model and the metrics, with digests in the
  event extras.
* GPU tasks (``train``) run on the Celery queue ``airflow.gpu_queue`` in the pool ``airflow.gpu_pool``
  that limits concurrent GPU jobs; under LocalExecutor the queue is ignored and training falls back
  to CPU when no CUDA device is present.
* Retries with exponential backoff on every task; bad data / failed validation fail at once.
* The params file is ``$SKIN_TWIN_PARAMS`` or ``params.yaml`` at the project root.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, chain, dag, get_current_context, task

try:
    from pipeline.app import orchestration as orch
except ImportError:  # the dags folder deployed beside the project without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.app import orchestration as orch

CFG = orch.load_base_config()
AF = CFG.airflow
ASSETS = {key: Asset(**spec) for key, spec in orch.ASSETS.items()}


def _schedule():
    if AF.schedule_on_asset and AF.schedule:
        from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

        return AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(AF.schedule, timezone="UTC"), assets=[ASSETS["raw_data"]]
        )
    if AF.schedule_on_asset:
        return [ASSETS["raw_data"]]
    return AF.schedule


def _outlets(name: str) -> list[Asset]:
    key = orch.TASK_OUTLETS.get(name)
    return [ASSETS[key]] if key else []


def _run(name: str) -> dict:
    """Body of every task: run the stage(s), attach Asset event extras, return the XCom summary."""
    ctx = get_current_context()
    trigger = orch.trigger_extras_from(ctx.get("triggering_asset_events"))
    dag_run, ti = ctx.get("dag_run"), ctx.get("ti")
    facts = {
        "triggered_by": orch.triggering_user(dag_run),
        "queue": getattr(ti, "queue", None),
        "try_number": getattr(ti, "try_number", None),
    }
    summary = orch.run_stage(name, ctx["run_id"], dict(ctx["params"]), trigger_extras=trigger, task_facts=facts)
    for asset in _outlets(name):
        ctx["outlet_events"][asset].extra.update(orch.asset_extra(name, summary))
    return summary


def _make_task(name: str):
    routing = orch.task_routing(name, CFG)  # GPU tasks: {"queue", "pool", "pool_slots"}; others: {}

    @task(task_id=name, outlets=_outlets(name), **routing)
    def run_task() -> dict:
        return _run(name)

    return run_task()


@dag(
    dag_id=orch.DAG_ID,
    description="Lightweight twin CNN for dermoscopy images: data -> model -> registry",
    schedule=_schedule(),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=AF.max_active_runs,
    tags=["skin-twin", "ml"],
    default_args={
        "owner": "skin-twin",
        "retries": AF.retries,
        "retry_delay": timedelta(seconds=AF.retry_delay_s),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=max(AF.retry_delay_s * 16, 60)),
    },
    params={
        "data_source": Param(
            None,
            type=["null", "string"],
            enum=[None, *orch.source_names()],
            description="Data source for this run (default: data.source of the params file).",
        ),
        "data_root": Param(
            None,
            type=["null", "string"],
            description="Data root for this run (relative paths: relative to the params file's folder).",
        ),
        "data_csv": Param(None, type=["null", "string"], description="Sources with a label CSV (isic_csv)."),
        "overrides": Param(
            {},
            type="object",
            description='Dotted-key parameter overrides, e.g. {"train.epochs": 2}.',
        ),
    },
    doc_md=__doc__,
)
def skin_twin():
    chain(*[_make_task(name) for name in orch.TASKS])


skin_twin()
