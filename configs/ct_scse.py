"""CT liver: U-Net with scSE blocks (max-out) after each encoder and decoder block.

    python launch.py --config configs/ct_scse.py --config.data.root=/data/CHAOS_Train_Sets/Train_Sets
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.modality = "CT"
    config.data.sequences = ("CT",)
    config.model.se = "scse"
    return config
