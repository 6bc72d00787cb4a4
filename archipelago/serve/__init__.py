"""Serving an ensemble: the MLflow pyfunc model of a registered ensemble (mlflow_model.py) and, beside it, the
Ray Serve application. Each module imports its framework lazily: `import archipelago` never pulls them in.
"""
