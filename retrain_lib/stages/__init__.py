"""The pipeline's stages as plain functions on files and storage: ingest, tiling, inference,
evaluation, mining, dataset assembly, the model registry, and the weights resolver.

They know nothing of cycles, the CLI or Airflow.
"""
