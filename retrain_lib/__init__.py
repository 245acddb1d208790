"""AutoRetrain: continuous retraining of object detectors for overhead imagery.

Every pipeline stage is a plain function in its own module and runs without Airflow.
Heavy imports (torch, ultralytics, rasterio) live inside the modules that need them, so
importing this package stays cheap.
"""

__version__ = "0.1.0"
