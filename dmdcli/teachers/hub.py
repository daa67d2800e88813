"""Loading diffusers/transformers components from a local folder or the Hugging Face Hub,
with one clear line (UserError) when a model cannot be had, offline above all."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..utils.errors import UserError

ALIASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
           "sd35-medium": "stabilityai/stable-diffusion-3.5-medium"}
# Teachers shipped inside the package (diffusers folders), by name.
SHIPPED = {"fashion-mnist": Path(__file__).resolve().parent.parent / "assets" / "fashion-teacher"}
# EDM teachers shipped inside the package (dmd-edm/1 folders), by name.
SHIPPED_EDM = {"fashion-mnist": Path(__file__).resolve().parent.parent / "assets" / "fashion-edm-teacher"}
# One-step students shipped inside the package (`dmd export` folders), by name.
SHIPPED_STUDENTS = {"fashion-mnist-dmd2": Path(__file__).resolve().parent.parent / "assets" / "fashion-dmd2-student"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(model: str) -> str:
    if model in SHIPPED:
        return str(SHIPPED[model])
    return ALIASES.get(model, model)


def load(cls, model: str, subfolder: str | None = None, revision: str = "", what: str = "teacher model", **kwargs):
    """cls.from_pretrained(model, subfolder) or a UserError naming the model (`what` it is) and the fix."""
    repo = resolve(model)
    where_kw = {"subfolder": subfolder} if subfolder else {}   # transformers refuses subfolder=None
    local = Path(repo).expanduser()
    if local.exists():
        where = local / subfolder if subfolder else local
        if not where.is_dir():
            raise UserError(f"{local} has no '{subfolder}' folder; give a diffusers model folder "
                            f"(as written by save_pretrained)")
        try:
            return cls.from_pretrained(str(local), **where_kw, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load {cls.__name__} from {where}: {str(e).splitlines()[0][:200]}; "
                            f"is it the right kind of model folder, with its weights?") from None
    if not _HUB_ID.match(repo):
        raise UserError(f"model folder not found: {model}; give a local diffusers folder or a Hub id (owner/name)")
    try:
        return cls.from_pretrained(repo, revision=revision or None, **where_kw, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "is not available offline (HF_HUB_OFFLINE is set and it is not in the Hugging Face cache)" if offline \
            else f"could not be loaded ({str(e).splitlines()[0][:200]})"
        raise UserError(f"{what} '{repo}' {why}; download it where there is a network "
                        f"(huggingface-cli download {repo}) or give a local folder made by save_pretrained") from None
