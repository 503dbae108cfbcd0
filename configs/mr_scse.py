"""MR T2-SPIR liver, kidneys and spleen: U-Net with scSE blocks (max-out) after each encoder
and decoder block.

    python launch.py --config configs/mr_scse.py --config.data.root=/data/CHAOS_Train_Sets/Train_Sets

T1-DUAL instead of T2-SPIR: --config.data.sequences='("T1DUAL_InPhase",)'.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.modality = "MR"
    config.data.sequences = ("T2SPIR",)
    config.model.se = "scse"
    return config
