"""Fine-tuning YOLO on one dataset version: the request/result contract, dataset sources,
MLflow tracking, scratch and resumption, the fit itself, the entrypoint
(``python -m retrain_lib.training``) and the runners (local process, Docker).
"""
