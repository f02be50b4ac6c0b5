"""The entry points: the stage table, the CLI, the Airflow glue, ``dvc.yaml`` generation, ``make run``."""
