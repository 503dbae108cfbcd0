"""MR T2-SPIR liver, kidneys and spleen: plain U-Net, the CPU recipe of configs/mr_scse_cpu.py.

    python launch.py --config configs/mr_unet_cpu.py --config.data.root=../shared/data/chaos_mr_t2
"""

from configs import mr_scse_cpu


def get_config():
    config = mr_scse_cpu.get_config()
    config.model.se = "none"
    return config
