"""Training engine: the run config, the train loop, evaluation, DDP, and the state that survives a crash."""

from .config import RunConfig, build_config
from .evaluate import evaluate, predict
from .run import Run, build_run, restore
from .train import FitResult, Interrupted, TrainingDiverged, fit, train, train_epoch

__all__ = [
    'FitResult',
    'Interrupted',
    'Run',
    'RunConfig',
    'TrainingDiverged',
    'build_config',
    'build_run',
    'evaluate',
    'fit',
    'predict',
    'restore',
    'train',
    'train_epoch',
]
