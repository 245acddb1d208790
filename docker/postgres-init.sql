-- A second database for MLflow's metadata beside Airflow's.
CREATE DATABASE mlflow;
