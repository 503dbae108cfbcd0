"""MR T2-SPIR: the scSE CPU recipe (configs/mr_scse_cpu.py) computing in bfloat16, for GPUs.

    python launch.py --config configs/mr_scse_bf16.py --config.data.root=../shared/data/chaos_mr_t2

Parameters, optimiser state and the loss stay float32; convolutions and activations run in
bfloat16 (model.compute_dtype). The GPU study (benchmarks/gpu_study.sh) trains it beside the
float32 recipe and reports the Dice difference between them.
"""

from configs import mr_scse_cpu


def get_config():
    config = mr_scse_cpu.get_config()
    config.model.compute_dtype = "bfloat16"
    return config
