"""Experiments: the grid of `fseft benchmark` (methods x k x seeds x structures, `run_benchmark`)
and `fseft demo`."""


from fseft.experiments.demo import DemoConfig, run_demo
from fseft.experiments.grid import BenchmarkResult, ExperimentConfig, load_experiment, plan_runs, run_benchmark

__all__ = ["BenchmarkResult", "DemoConfig", "ExperimentConfig", "load_experiment", "plan_runs", "run_benchmark", "run_demo"]
