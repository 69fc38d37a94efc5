"""Speed of the SD-LoRA train step, merged evaluation and the input pipeline.

``python -m experiments.benchmark --help`` lists the options (`__main__`);
docs/benchmark.md says what each row measures. Importing this package defines
no command-line flag.

Modules: `settings` (the options), `run` (the phases, in order), `workload`
(the random model and states), `train_steps`, `evaluation`, `pipeline`,
`baselines` (plain LoRA), `compile_checks`, `flops`, `profile`, `ratios`,
`versus_torch` (the PyTorch port, in its own process), `timing`,
`table`.
"""

from experiments.benchmark.baselines import make_plain_lora_step
from experiments.benchmark.compile_checks import (CompileCounter,
                                                  counter_self_check,
                                                  jaxpr_stats)
from experiments.benchmark.flops import (accelerator_estimates, analytic_flops,
                                         matmul_peak)
from experiments.benchmark.pipeline import write_jpeg_folder
from experiments.benchmark.run import run
from experiments.benchmark.settings import Settings
from experiments.benchmark.table import Row, Table, report, save_json
from experiments.benchmark.workload import random_params

__all__ = ["CompileCounter", "Row", "Settings", "Table", "accelerator_estimates",
           "analytic_flops", "counter_self_check", "jaxpr_stats",
           "make_plain_lora_step", "matmul_peak", "random_params", "report",
           "run", "save_json", "write_jpeg_folder"]
