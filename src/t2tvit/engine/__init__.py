"""Training engine: the run config, the train loop, evaluation, DDP, and the state that survives a crash."""

from .config import RunConfig, build_config
from .evaluate import evaluate, predict
from .train import FitResult, Interrupted, TrainingDiverged, fit, train_one_epoch

__all__ = [
    'FitResult',
    'Interrupted',
    'RunConfig',
    'TrainingDiverged',
    'build_config',
    'evaluate',
    'fit',
    'predict',
    'train_one_epoch',
]
