"""AutoRetrain: continuous retraining of object detectors for overhead imagery.

The package is a stack of layers, each a subpackage whose imports point down only
(docs/architecture.md): ``core`` <- ``geo`` <- ``stages`` <- ``training`` <- ``cycle`` <-
``airflow`` / ``devtools`` <- ``cli``. Everything but ``airflow`` runs without Airflow. Heavy
imports (torch, ultralytics, mlflow) live inside the functions that need them, so importing
``core`` and ``airflow`` stays cheap enough for DAG parsing.
"""

__version__ = "0.1.0"
