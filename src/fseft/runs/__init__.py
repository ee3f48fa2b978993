"""The run folder of an adaptation: its format (`format`: adapter files in peft's layout, the
record) and loading it back (`load`: `load_adapted_model`, `list_runs`)."""


from fseft.runs.format import read_run_record, save_adapter, write_run_files
from fseft.runs.load import (
    AdaptedModel,
    AdaptedNetwork,
    RunSummary,
    format_run_table,
    list_runs,
    load_adapted_model,
    load_base,
)

__all__ = ["AdaptedModel", "AdaptedNetwork", "RunSummary", "format_run_table", "list_runs", "load_adapted_model", "load_base", "read_run_record", "save_adapter", "write_run_files"]
