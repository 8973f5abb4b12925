"""Training recipes: what `train.py --precond` builds — the network class, its loss and the FDM multiplier default.

The network classes come from `networks.PRECONDITIONERS`; the FDM variants train with their baseline's loss
(plus the warm-up). A preconditioner without a recipe samples published networks but cannot be trained here.
"""

import collections

from training import networks

Recipe = collections.namedtuple('Recipe', [
    'network',              # Dotted class name of the preconditioned network.
    'loss',                 # Dotted class name of the loss.
    'fdm_multiplier',       # --fdm_multiplier when not given; None = not an FDM recipe.
])

# The multiplier defaults reproduce the published runs (their VE-FDM ignored m, i.e. used 1).
RECIPES = {
    'vp':      Recipe(networks.PRECONDITIONERS['vp'],      'training.loss.VPLoss',  None),
    've':      Recipe(networks.PRECONDITIONERS['ve'],      'training.loss.VELoss',  None),
    'edm':     Recipe(networks.PRECONDITIONERS['edm'],     'training.loss.EDMLoss', None),
    'fdm_vp':  Recipe(networks.PRECONDITIONERS['fdm_vp'],  'training.loss.VPLoss',  2.0),
    'fdm_ve':  Recipe(networks.PRECONDITIONERS['fdm_ve'],  'training.loss.VELoss',  networks.PUBLISHED_VE_FDM_MULTIPLIER),
    'fdm_edm': Recipe(networks.PRECONDITIONERS['fdm_edm'], 'training.loss.EDMLoss', 2.0),
}

# Preconditioners that sample but do not train, and why.
NOT_TRAINABLE = {
    'iddpm': 'neither EDM nor FDM publishes an iDDPM loss; its networks are for sampling published checkpoints',
}

# Geometric augmentations enabled by --augment (each applied with probability p), as EDM trains.
AUGMENT_OPTIONS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
