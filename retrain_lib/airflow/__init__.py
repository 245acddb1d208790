"""Everything that needs Airflow, for the DAG files and the plugin: parse-time config, the
settings a task runs with (connections, Variables), the task boilerplate, and the MLflow
links. The only package of retrain_lib that imports Airflow.
"""
