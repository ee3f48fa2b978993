"""Supervised pre-training on an assembly of partially labelled datasets (`fseft pretrain`).

Modules: `assembly` (the YAML as typed configs, its datasets resolved), `volume_cache` (each
volume preprocessed once), `loop` (`pretrain`, on `fseft.training.fit.train_epochs`),
`validation` (held-out Dice, post-processing choice), `checkpoints` (resume state, initial
weights, the final model file), `log` (``log.jsonl`` / ``log.csv`` / TensorBoard).
"""

from fseft.pretraining.assembly import (
    AssemblyConfig,
    DatasetEntry,
    PretrainConfig,
    ValidationConfig,
    assembly_from_dict,
    load_assembly,
    resolve_sources,
    resolve_validation,
)
from fseft.pretraining.checkpoints import transfer_weights
from fseft.pretraining.loop import PretrainResult, pretrain
from fseft.pretraining.volume_cache import prepare_cache

__all__ = ["AssemblyConfig", "DatasetEntry", "PretrainConfig", "PretrainResult", "ValidationConfig",
           "assembly_from_dict", "load_assembly", "prepare_cache", "pretrain", "resolve_sources",
           "resolve_validation", "transfer_weights"]
