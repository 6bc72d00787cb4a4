"""MLflow models-from-code entry of an Archipelago ensemble: MLflow copies this file into the model and runs it
at load time instead of unpickling a Python object (see mlflow_model.py for the input and output)."""
import mlflow
from mlflow.pyfunc import PythonModel

from archipelago.serve.mlflow_model import EnsembleModel


class EnsemblePyfunc(EnsembleModel, PythonModel):
    """EnsembleModel as an mlflow.pyfunc.PythonModel."""


mlflow.models.set_model(EnsemblePyfunc())
