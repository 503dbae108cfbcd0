"""The CPU recipe on the built-in synthetic phantoms, sized to finish in minutes on a laptop.

    python launch.py --config configs/quickstart.py

configs/mr_scse_cpu.py with a batch of 4, so that the phantoms' five training patients still
give 20 Adam steps an epoch (one pass over their slices), for 16 epochs; one validation
patient, whose Dice the run prints each epoch; and the plain contrast jitter and no deep
supervision, with which the README's quick-start figures were measured: the phantoms share one
synthetic intensity model, and GIN is there for the intensity differences between real scanners
and patients.
Phantoms are far easier than real abdomens: the Dice it ends with shows that the pipeline
learns, not how well the model segments patients (docs/results/ has that).
"""

from configs import mr_scse_cpu


def get_config():
    config = mr_scse_cpu.get_config()
    config.train.batch_size = 4
    config.train.num_epochs = 16
    config.train.decay_epochs = 8
    config.data.intensity_augmentation = "jitter"
    config.data.num_val_patients = 1
    config.model.deep_supervision = False
    config.train.steps_per_epoch = 0
    return config
