"""CT liver: plain U-Net.

    python launch.py --config configs/ct_unet.py --config.data.root=/data/CHAOS_Train_Sets/Train_Sets
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.modality = "CT"
    config.data.sequences = ("CT",)
    config.model.se = "none"
    return config
