"""The development environment of the local stack: what ``masactrl up`` prepares before it starts
anything, and the variables its processes run with.

Everything lives in one folder (``var`` by default):

- ``dev-api-key``, ``dev-webhook-secret``, ``url-signing-secret``: created once, mode 0600, and
  kept, so a key that a developer copied keeps working across restarts;
- the models: by default two, each served by a worker of its own: the committed toy-world
  checkpoint ``models/toy-shapes`` of the repository (trained here, it draws: see
  docs/toy-world.md), the catalog's default, and beside it the random-weight tiny checkpoint
  ``tiny`` (``models/tiny-sd``), whose ControlNet makes layouts and sequences run on the default
  stack (the toy model has no condition model). The tiny checkpoint is written by ``masactrl
  tiny-model`` in a subprocess (the stack itself never imports torch), with
  ``models/tiny-controlnet``, a seeded tiny ControlNet offered in the catalog as the condition
  model ``canny`` (its weights are random: it shows the plumbing of a layout-guided edit, not a
  real edge-guided image) and ``models/tiny-preview-vae``, a seeded tiny ``AutoencoderTiny``, the
  entry's ``preview_vae`` that decodes live previews (random too). ``MASACTRL_MODEL=<x>`` serves
  only ``x``: ``tiny``, a catalog model, a folder or a hub id (previews then decode with the
  model's own VAE);
- ``catalog.json``: the catalog of those models, the first one the default;
- ``storage``: the ``file://`` object storage.

The processes run in development mode, which allows the two things production refuses and the
stack needs: the plaintext dev key and webhooks to loopback receivers. Starting, finding and
stopping processes is :mod:`masactrl_cli.stack`'s concern, not this module's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from masactrl_cli.errors import StackError
from masactrl_core.sources import looks_like_path
from masactrl_jobs.catalog import tiny_model_entry

__all__ = [
    "TINY_CONDITION",
    "TINY_LORA",
    "TINY_MODEL",
    "TOY_MODEL",
    "DevEnv",
    "bundled",
    "catalog_entries",
    "catalog_entry",
    "display_path",
]

# The condition model name the tiny entry offers (``masactrl demo`` runs a canny edit with it).
TINY_CONDITION = "canny"
# The LoRA adapter the tiny entry offers (a seeded random one: the README's LoRA run).
TINY_LORA = "tiny-style"
# The catalog name of the random-weight tiny checkpoint (``MASACTRL_MODEL=tiny``).
TINY_MODEL = "tiny"
# The committed toy-world checkpoint, relative to the repository: the stack's default model.
TOY_MODEL = Path("models/toy-shapes")

_BUILTIN_MODELS = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
}


def display_path(path: Path) -> str:
    """``path`` relative to the current directory when it is below it, as messages show it."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def bundled(relative: Path) -> Path | None:
    """A file or folder of the repository: from the current directory (``make``) or, for an
    installed package, next to its sources; None if neither has it."""
    for candidate in (relative, Path(__file__).resolve().parents[1] / relative):
        if candidate.exists():
            return candidate
    return None


# --- the model ------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-_.")[:63]
    return slug or "custom"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# The MM-DiT families by their pipeline class; their sizes are left to the worker to measure.
_PIPELINE_FAMILIES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}


def _folder_entry(folder: Path) -> dict[str, Any]:
    """Family and sizes from a diffusers folder's configs (family defaults otherwise)."""
    index = _read_json(folder / "model_index.json")
    family = _PIPELINE_FAMILIES.get(str(index.get("_class_name", "")), "sd")
    if family == "sd" and "XL" in str(index.get("_class_name", "")):
        family = "sdxl"
    entry: dict[str, Any] = {"family": family}
    unet, vae = _read_json(folder / "unet/config.json"), _read_json(folder / "vae/config.json")
    vae_blocks, unet_blocks = vae.get("block_out_channels"), unet.get("down_block_types")
    sample = unet.get("sample_size")
    if isinstance(vae_blocks, list) and isinstance(unet_blocks, list) and isinstance(sample, int):
        vae_factor = 2 ** (len(vae_blocks) - 1)
        entry["native_width"] = entry["native_height"] = sample * vae_factor
        # The UNet halves the latent once per down block but the last.
        entry["size_multiple"] = vae_factor * 2 ** (len(unet_blocks) - 1)
    return entry


def catalog_entry(model: str | None, tiny_model: Path) -> dict[str, Any]:
    """The catalog entry the stack serves: the toy-world checkpoint, or ``model``.

    ``model`` is ``tiny`` (the random-weight tiny checkpoint at ``tiny_model``), a built-in
    catalog name (``sd15``, ``sdxl``), a local diffusers folder (family and native size read from
    its configs) or a hub id (family from the name: ``flux`` means FLUX.1, ``stable-diffusion-3``
    SD3, ``xl`` SDXL; SD 2.x non-base checkpoints are 768 px). Without one, the committed toy
    checkpoint (the tiny one where it is missing).
    """
    model = (model or "").strip()
    if not model:
        toy = bundled(TOY_MODEL)
        model = str(toy.resolve()) if toy is not None else "tiny"
    if model == TINY_MODEL:
        return tiny_model_entry(str(tiny_model.resolve()))
    if model in _BUILTIN_MODELS:
        source, family = _BUILTIN_MODELS[model]
        return {"name": model, "source": source, "family": family}
    for name, (source, family) in _BUILTIN_MODELS.items():
        if model == source:
            return {"name": name, "source": source, "family": family}
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise StackError(f"MASACTRL_MODEL={model} is a folder without model_index.json")
        return {
            "name": _slug(folder.resolve().name),
            "source": str(folder.resolve()),
            **_folder_entry(folder),
        }
    if looks_like_path(model):
        raise StackError(f"MASACTRL_MODEL={model}: no such folder (and not a hub id)")
    lowered = model.lower()
    family = "sdxl" if "xl" in lowered else "sd"
    if "flux" in lowered:
        family = "flux"
    elif "stable-diffusion-3" in lowered:
        family = "sd3"
    entry: dict[str, Any] = {
        "name": _slug(model.rsplit("/", 1)[-1]),
        "source": model,
        "family": family,
    }
    if re.search(r"stable-diffusion-2(?!.*base)", lowered):
        entry["native_width"] = entry["native_height"] = 768
    return entry


def catalog_entries(model: str | None, tiny_model: Path) -> list[dict[str, Any]]:
    """The catalog entries the stack serves, the default first: ``model`` alone when one is
    named (see :func:`catalog_entry`); otherwise the toy checkpoint and, beside it, the tiny one,
    which brings the condition model that layouts and sequences need."""
    entry = catalog_entry(model, tiny_model)
    if (model or "").strip() or entry["name"] == TINY_MODEL:
        return [entry]
    return [entry, catalog_entry(TINY_MODEL, tiny_model)]


# --- the folder -----------------------------------------------------------------------------------


def _secret(path: Path, make: Callable[[], str]) -> str:
    """Read ``path``, or create it (mode 0600) with ``make()`` the first time."""
    try:
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # an empty file left by an interrupted run
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    return value


def _tiny_model(argv: list[str], what: str) -> None:
    """``masactrl tiny-model ARGV`` in a subprocess: the stack itself never imports torch."""
    result = subprocess.run(
        [sys.executable, "-m", "masactrl_cli.main", "tiny-model", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise StackError(f"cannot write {what}: {reason}")


class DevEnv:
    """One stack's development environment, rooted at ``var``."""

    def __init__(self, var: Path) -> None:
        self.var = var
        self.storage = var / "storage"
        self.models = var / "models"
        self.tiny_model = self.models / "tiny-sd"
        self.tiny_controlnet = self.models / "tiny-controlnet"
        self.tiny_preview_vae = self.models / "tiny-preview-vae"
        self.tiny_lora = self.models / "tiny-lora"
        self.catalog = var / "catalog.json"
        self.api_key_file = var / "dev-api-key"
        self.webhook_secret_file = var / "dev-webhook-secret"
        self.signing_secret_file = var / "url-signing-secret"

    def api_key(self) -> str:
        """The dev tenant's API key (created on first use)."""
        return _secret(self.api_key_file, lambda: "mctl_dev_" + secrets.token_urlsafe(24))

    def webhook_secret(self) -> str:
        """The dev tenant's Standard Webhooks secret (created on first use)."""
        return _secret(
            self.webhook_secret_file,
            lambda: "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
        )

    def prepare(self, entries: list[dict[str, Any]], say: Callable[[str], None]) -> None:
        """The storage folder, the tiny checkpoint if ``entries`` serve it, and the catalog (its
        default: the first entry)."""
        self.storage.mkdir(parents=True, exist_ok=True)
        models = [self._with_tiny_extras(entry, say) for entry in entries]
        self.catalog.write_text(
            json.dumps({"default": models[0]["name"], "models": models}) + "\n", encoding="utf-8"
        )

    def _with_tiny_extras(
        self, entry: dict[str, Any], say: Callable[[str], None]
    ) -> dict[str, Any]:
        """``entry``, and for the tiny checkpoint its files written and its ControlNet, preview
        autoencoder and LoRA adapter added."""
        if entry["name"] != TINY_MODEL:
            return entry
        self._write_tiny_model(say)
        self._write_tiny_controlnet(say)
        self._write_tiny_preview_vae(say)
        self._write_tiny_lora(say)
        condition = {"source": str(self.tiny_controlnet.resolve()), "kind": "controlnet"}
        return {
            **entry,
            "conditions": {TINY_CONDITION: condition},
            "loras": {TINY_LORA: {"source": str(self.tiny_lora.resolve())}},
            "preview_vae": str(self.tiny_preview_vae.resolve()),
        }

    def _write_tiny_model(self, say: Callable[[str], None]) -> None:
        folder = self.tiny_model
        if (folder / "model_index.json").is_file():
            return
        say(f"writing the offline tiny checkpoint to {display_path(folder)}")
        _tiny_model([str(folder)], "the tiny checkpoint")

    def _write_tiny_controlnet(self, say: Callable[[str], None]) -> None:
        folder = self.tiny_controlnet
        if (folder / "config.json").is_file():
            return
        say(f"writing the offline tiny ControlNet to {display_path(folder)}")
        argv = [str(folder), "--condition", "controlnet", "--base", str(self.tiny_model)]
        _tiny_model(argv, "the tiny ControlNet")

    def _write_tiny_preview_vae(self, say: Callable[[str], None]) -> None:
        folder = self.tiny_preview_vae
        if (folder / "config.json").is_file():
            return
        say(f"writing the offline tiny preview autoencoder to {display_path(folder)}")
        _tiny_model([str(folder), "--preview-vae"], "the tiny preview autoencoder")

    def _write_tiny_lora(self, say: Callable[[str], None]) -> None:
        folder = self.tiny_lora
        if (folder / "pytorch_lora_weights.safetensors").is_file():
            return
        say(f"writing the offline tiny LoRA adapter to {display_path(folder)}")
        _tiny_model([str(folder), "--lora", "--base", str(self.tiny_model)], "the tiny LoRA")

    def environment(self, *, api_url: str, redis_url: str, models: list[str]) -> dict[str, str]:
        """The variables of every stack process: this shell's, with the stack's on top.
        ``models``: the names served, the default first."""
        env = {
            name: value
            for name, value in os.environ.items()
            # The stack's own settings and the client's would only confuse the services.
            if not name.startswith("MASACTRL_STACK_")
            and name not in ("MASACTRL_API_URL", "MASACTRL_API_KEY")
        }
        env.update(
            {
                "MASACTRL_ENVIRONMENT": "development",
                "MASACTRL_REDIS_URL": redis_url,
                "MASACTRL_STORAGE_URL": self.storage.resolve().as_uri(),
                "MASACTRL_URL_SIGNING_SECRET": _secret(
                    self.signing_secret_file, lambda: secrets.token_urlsafe(32)
                ),
                "MASACTRL_PUBLIC_BASE_URL": api_url,
                "MASACTRL_CATALOG_FILE": str(self.catalog.resolve()),
                # Blank beats a MASACTRL_CATALOG in a .env file ("set one of the two at most").
                "MASACTRL_CATALOG": "",
                "MASACTRL_MODEL": models[0],
                "MASACTRL_DEV_API_KEY": self.api_key(),
                "MASACTRL_DEV_WEBHOOK_SECRET": self.webhook_secret(),
                # Development only (refused in production): a developer's own webhook receiver.
                "MASACTRL_ALLOW_LOOPBACK_HTTP": "true",
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Where s3:// model sources are downloaded: inside the stack's folder, like the rest.
        env.setdefault("MASACTRL_MODEL_CACHE_DIR", str(self.models.resolve()))
        if TINY_MODEL in models:
            env.setdefault("HF_HUB_OFFLINE", "1")
        return env
