"""Teacher adapters: the interface (base.py) and one module per family: the exact Gaussian
mixture (gmm.py), diffusers' Stable Diffusion and pixel UNets (diffusers_unets.py), SD3 (sd3.py), SDXL (sdxl.py), NVIDIA's
EDM networks (edm.py, with convert_edm.py reading their pickles safely), and loading models
offline (hub.py); architectures.py holds published architectures without weights, for the dry
run. The registry below imports a family's module only when a recipe names it.
"""

from __future__ import annotations

from .base import Teacher, make_student, real_score, resolve_dtype, uint8_images

__all__ = ["Teacher", "build_teacher", "make_student", "real_score", "resolve_dtype", "uint8_images"]


def build_teacher(cfg) -> Teacher:
    """Construct the teacher named by a recipe's [teacher] section."""
    if cfg.name == "gmm":
        from .gmm import GMMTeacher

        return GMMTeacher(cfg.gmm)
    if cfg.name == "sd":   # Stable Diffusion 1.x/2.x, XL or 3/3.5, by the folder's model_index.json
        from .sd3 import SD3Teacher, is_sd3, pipeline_config
        from .sdxl import SDXLTeacher, is_sdxl

        if is_sd3(cfg.sd.model, cfg.sd.revision):
            return SD3Teacher(cfg.sd)
        config = pipeline_config(cfg.sd.model, cfg.sd.revision)
        if is_sdxl(config):
            return SDXLTeacher(cfg.sd, config)
        from .diffusers_unets import SDTeacher

        return SDTeacher(cfg.sd)
    if cfg.name == "unet2d":
        from .diffusers_unets import UNet2DTeacher

        return UNet2DTeacher(cfg.unet2d)
    if cfg.name == "edm":
        from .edm import EDMTeacher

        return EDMTeacher(cfg.edm)
    from ..utils.errors import UserError

    raise UserError(f"unknown teacher {cfg.name!r}: available teachers are 'gmm', 'sd', 'unet2d', 'edm'")
