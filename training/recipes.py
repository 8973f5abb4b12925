"""Training recipes: what `train.py --precond` builds, and the published runs as presets (`train.py --preset`).

The network classes come from `networks.PRECONDITIONERS`; the FDM variants train with their baseline's loss
(plus the warm-up). iDDPM has no recipe: neither EDM nor FDM publishes its loss, so its networks only sample
published checkpoints.
"""

import collections
import inspect

import dnnlib
from training import networks

Recipe = collections.namedtuple('Recipe', [
    'network',              # Dotted class name of the preconditioned network.
    'loss',                 # Dotted class name of the loss.
])

RECIPES = {
    'vp':      Recipe(networks.PRECONDITIONERS['vp'],      'training.loss.VPLoss'),
    've':      Recipe(networks.PRECONDITIONERS['ve'],      'training.loss.VELoss'),
    'edm':     Recipe(networks.PRECONDITIONERS['edm'],     'training.loss.EDMLoss'),
    'fdm_vp':  Recipe(networks.PRECONDITIONERS['fdm_vp'],  'training.loss.VPLoss'),
    'fdm_ve':  Recipe(networks.PRECONDITIONERS['fdm_ve'],  'training.loss.VELoss'),
    'fdm_edm': Recipe(networks.PRECONDITIONERS['fdm_edm'], 'training.loss.EDMLoss'),
}

# Geometric augmentations enabled by --augment (each applied with probability p), as EDM trains.
AUGMENT_OPTIONS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def fdm_multiplier_default(precond):
    """The FDM multiplier m a recipe trains with when none is given: its network's constructor default (2, and 1 for
    VE-FDM as the published runs had it); None for a recipe that is not FDM."""
    network = dnnlib.util.get_obj_by_name(RECIPES[precond].network)
    parameter = inspect.signature(network.__init__).parameters.get('fdm_multiplier')
    return None if parameter is None else float(parameter.default)


# The published FDM runs (8 GPUs each) and the quickstart's small network, as train.py option values by name;
# options given beside --preset override it. The README lists the same runs as long commands.
_FFHQ_AFHQ = dict(cond=False, batch=256, cres=[1, 2, 2, 2], lr=2e-4, augment=0.15)
PRESETS = {
    'cifar10-fdm_edm':  dict(cond=True, arch='ddpmpp', precond='fdm_edm', warmup_ite=200),
    'cifar10-fdm_vp':   dict(cond=True, arch='ddpmpp', cres=[1, 2, 2, 2], precond='fdm_vp', warmup_ite=400),
    'cifar10-fdm_ve':   dict(cond=True, arch='ncsnpp', cres=[1, 2, 2, 2], precond='fdm_ve', warmup_ite=400),
    'ffhq-fdm_edm':     dict(_FFHQ_AFHQ, arch='ddpmpp', dropout=0.05, precond='fdm_edm', warmup_ite=800, fdm_multiplier=1.0),
    'ffhq-fdm_vp':      dict(_FFHQ_AFHQ, arch='ddpmpp', dropout=0.05, precond='fdm_vp', warmup_ite=400, fdm_multiplier=1.0),
    'ffhq-fdm_ve':      dict(_FFHQ_AFHQ, arch='ncsnpp', dropout=0.05, precond='fdm_ve', warmup_ite=400),
    'afhqv2-fdm_edm':   dict(_FFHQ_AFHQ, arch='ddpmpp', dropout=0.25, precond='fdm_edm', warmup_ite=400),
    'afhqv2-fdm_vp':    dict(_FFHQ_AFHQ, arch='ddpmpp', dropout=0.25, precond='fdm_vp', warmup_ite=400),
    'afhqv2-fdm_ve':    dict(_FFHQ_AFHQ, arch='ncsnpp', dropout=0.25, precond='fdm_ve', warmup_ite=400),
    'quickstart':       dict(cond=True, arch='ddpmpp', cbase=16, cres=[1, 2, 2], blocks=1, attn=[], precond='fdm_edm',
                             warmup_ite=200, batch=32, lr=2e-3, lr_rampup=0.001, dropout=0.0, augment=0.0),
}


def with_preset(options, preset, given):
    """`options` (train.py's, by name) with the values of `preset` for every option not in `given` (those set on
    the command line)."""
    return {**options, **{name: value for name, value in PRESETS[preset].items() if name not in given}}
