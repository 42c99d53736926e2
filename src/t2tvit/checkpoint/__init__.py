"""Checkpoints in three small layers, as a file becomes a model's weights.

- :mod:`.io`: bytes -> Python objects (safe unpickling only, atomic writes, the released weights' cache);
- :mod:`.layouts`: objects -> our keys, one reader per layout (training, t2tvit safetensors, the authors'
  releases, their CIFAR transfers, plain state dicts, PASSL), and the reference layout written back;
- :mod:`.fit`: our keys -> a built model (new head, resized position table, other input channels), and
  which registered model a state dict is;
- :mod:`.convert`: weights written so that the file alone rebuilds its model, and conversion between layouts.

Turning a file into a new model is the factory's (:func:`t2tvit.create_model` with ``checkpoint_path``);
nothing here imports the factory or the models.
"""
from .convert import CONVERT_TARGETS, convert_checkpoint, save_model
from .fit import adapt_input_channels, closest_models, load_checkpoint, model_args_from_checkpoint
from .io import CheckpointError, atomic_save, fetch_pretrained, pretrained_path
from .layouts import (
    T2TVIT_FORMAT,
    T2TVIT_FORMAT_VERSION,
    TRAIN_FORMAT,
    TRAIN_FORMAT_VERSION,
    Checkpoint,
    passl_to_reference,
    read_checkpoint,
    save_reference,
    strip_prefixes,
)

__all__ = [
    'CONVERT_TARGETS',
    'T2TVIT_FORMAT',
    'T2TVIT_FORMAT_VERSION',
    'TRAIN_FORMAT',
    'TRAIN_FORMAT_VERSION',
    'Checkpoint',
    'CheckpointError',
    'adapt_input_channels',
    'atomic_save',
    'closest_models',
    'convert_checkpoint',
    'fetch_pretrained',
    'load_checkpoint',
    'model_args_from_checkpoint',
    'passl_to_reference',
    'pretrained_path',
    'read_checkpoint',
    'save_model',
    'save_reference',
    'strip_prefixes',
]
