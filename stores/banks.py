"""PatchCore memory banks on disk: one folder per product under ``Settings.banks_dir``.

``banks_dir/<product>/`` holds ``memory_bank.npy`` (float32 or float16 ``(M, D)``),
``train_descriptors.npy`` (float32 ``(N_train, C)``, global features used to find the
nearest normal training image) and ``meta.json`` (backbone, layers, image size, coreset
ratio, thresholds and their rules, colour scale, training image paths relative to the
state directory as ``state:<path>``); a bank scored by a SimpleNet-style head
(``scorer: simplenet``) also holds ``head.safetensors`` (its weights, safetensors format:
no pickle is loaded).

Crash safety: a bank is written to a temporary folder and swapped in with ``os.replace``
(the previous folder is first renamed to ``.old-<product>-*``); a store opened after a
crash between the two renames puts the previous bank back (:meth:`BankStore.recover`), so
a killed refit always leaves a usable bank. Banks are loaded lazily and cached per
product; a new store gives identical scores. A bank that cannot be read is reported by
:meth:`BankStore.broken` and skipped by :meth:`BankStore.products`, instead of stopping
the process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch

from core.catalog import UnknownProductError
from core.settings import Settings
from core.types import BankMeta
from models.patchcore.model import BuildGuard, PatchCore, Runtime
from models.patchcore.simplenet import head_from_state

log = logging.getLogger("dra.banks")

META_NAME = "meta.json"
BANK_NAME = "memory_bank.npy"
DESCRIPTORS_NAME = "train_descriptors.npy"
HEAD_NAME = "head.safetensors"


class BankNotFoundError(UnknownProductError, KeyError):
    """No fitted PatchCore memory bank exists for the requested product.

    Subclasses both ``core.catalog.UnknownProductError`` (a ``ValueError``)
    and ``KeyError``; ``str()`` gives the readable message.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "no memory bank"


def runtime_of(settings: Settings) -> Runtime:
    """The :class:`models.patchcore.model.Runtime` chosen by the settings."""
    return Runtime(backbone=settings.patchcore_backbone, search=settings.patchcore_search,
                   bank_dtype=settings.patchcore_bank_dtype, runtime=settings.patchcore_runtime)


class BankStore:
    """Per-product PatchCore memory banks under ``settings.banks_dir`` (persistence + cache).

    Args:
        settings: project settings (banks folder, state folder, runtime choices).
        guard: held while a loaded bank's model is built (:data:`models.patchcore.model.BuildGuard`).
    """

    def __init__(self, settings: Settings, guard: BuildGuard | None = None):
        self.settings = settings
        self.guard = guard
        self.banks_dir = Path(settings.banks_dir)
        self.runtime = runtime_of(settings)
        self._banks: dict[str, PatchCore] = {}
        self._broken: dict[str, str] = {}
        self._generation: dict[str, int] = {}  # bumped by save(): a load that raced a save is not cached
        self._lock = threading.Lock()
        self.recover()

    def recover(self) -> list[str]:
        """Repair ``banks_dir`` after a process died inside :meth:`save`.

        ``.old-<product>-*`` folders are previous banks renamed just before the new one
        was moved in: if ``<product>/`` is missing (killed between the two renames) the
        old folder is moved back, else it is deleted. ``.tmp-*`` folders are unfinished
        writes and are deleted.

        Returns:
            the products whose previous bank was restored.
        """
        restored: list[str] = []
        if not self.banks_dir.is_dir():
            return restored
        for d in sorted(self.banks_dir.iterdir()):
            if not d.is_dir():
                continue
            if d.name.startswith(".old-"):
                product = d.name[len(".old-"):].rsplit("-", 1)[0]
                target = self.banks_dir / product
                if not (target / META_NAME).is_file() and (d / META_NAME).is_file():
                    if target.exists():
                        shutil.rmtree(target, ignore_errors=True)
                    os.replace(d, target)
                    restored.append(product)
                    log.warning("PatchCore bank of %r restored after an interrupted refit", product)
                else:
                    shutil.rmtree(d, ignore_errors=True)
            elif d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
        return restored

    # ---- catalogue
    def products(self) -> list[str]:
        """Sorted product ids with a fitted, readable bank (``<banks_dir>/<p>/meta.json``)."""
        if not self.banks_dir.is_dir():
            return []
        return sorted(p.name for p in self.banks_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / META_NAME).is_file()
                      and p.name not in self._broken)

    def broken(self) -> dict[str, str]:
        """Banks that failed to load: ``{product: reason}``."""
        return dict(self._broken)

    def read_meta(self, product: str) -> dict:
        """A bank's meta.json without loading its model.

        Raises:
            BankNotFoundError: no bank folder. ValueError / OSError: an unreadable file.
        """
        path = self.banks_dir / str(product) / META_NAME
        if not path.is_file():
            raise BankNotFoundError(f"no PatchCore memory bank for product {product!r}")
        return json.loads(path.read_text(encoding="utf-8"))

    def meta(self, product: str) -> BankMeta:
        """The bank's record (loads the bank).

        Raises:
            BankNotFoundError: no (readable) bank for ``product``.
        """
        return BankMeta.from_dict(self.get(product).meta)

    # ---- load / save
    def _rel_path(self, path: str | None) -> str | None:
        """Paths under the state dir are stored relative to it (state copies stay valid)."""
        if path is None:
            return None
        p = Path(path).resolve()
        try:
            return "state:" + str(p.relative_to(Path(self.settings.state_dir).resolve()))
        except ValueError:
            return str(p)

    def _abs_path(self, path: str | None) -> str | None:
        if path is None:
            return None
        if path.startswith("state:"):
            return str(Path(self.settings.state_dir) / path[len("state:"):])
        return path

    def get(self, product: str) -> PatchCore:
        """The fitted bank of ``product``, loaded on first use and cached.

        The model is built outside the store's lock (under ``guard``), so a thread loading
        one bank never holds up another thread's lookups.

        Raises:
            BankNotFoundError: no bank, or one that cannot be read (the reason is kept
                in :meth:`broken` and logged once).
        """
        with self._lock:
            bank = self._banks.get(product)
            if bank is not None:
                return bank
            broken = self._broken.get(product)
            generation = self._generation.get(product, 0)
        folder = self.banks_dir / str(product)
        if broken or not (folder / META_NAME).is_file():
            known = self.products()
            why = f" (unreadable: {broken})" if broken else ""
            raise BankNotFoundError(
                f"no PatchCore memory bank for product {product!r}{why}; fitted products: {known or 'none'} "
                f"(run `python cli.py build` or fit the product first)")
        try:
            meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
            paths = [self._abs_path(p) for p in meta.get("train_paths", [])]
            head = None
            if meta.get("scorer", "knn") == "simplenet":
                head = head_from_state(safetensors.torch.load_file(folder / HEAD_NAME))
            bank = PatchCore.from_arrays(meta, np.load(folder / BANK_NAME), np.load(folder / DESCRIPTORS_NAME),
                                         paths, self.runtime, self.guard, head=head)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, safetensors.SafetensorError) as exc:
            with self._lock:
                self._broken[product] = f"{type(exc).__name__}: {exc}"
            log.warning("skipping the PatchCore bank of %r: %s", product, self._broken[product])
            raise BankNotFoundError(f"the PatchCore memory bank of {product!r} cannot be read "
                                    f"({self._broken[product]}); refit the product") from None
        with self._lock:
            if self._generation.get(product, 0) != generation:
                return bank  # a save happened meanwhile: use it once, do not cache it
            return self._banks.setdefault(product, bank)

    def save(self, product: str, bank: PatchCore) -> None:
        """Write ``bank`` as ``product``'s memory bank, atomically (see the module docstring).

        The cached bank is dropped: the next :meth:`get` reads it back from disk
        (identical numbers after a restart).
        """
        meta = dict(bank.meta)
        meta["train_paths"] = [self._rel_path(p) for p in bank.train_paths]
        self.banks_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{product}-", dir=self.banks_dir))
        try:
            dtype = np.float16 if meta.get("bank_dtype") == "float16" else np.float32
            np.save(tmp / BANK_NAME, bank.memory_bank.detach().cpu().numpy().astype(dtype))
            np.save(tmp / DESCRIPTORS_NAME, bank.descriptors.detach().cpu().numpy().astype(np.float32))
            if bank.head is not None:
                safetensors.torch.save_file({k: v.detach().contiguous() for k, v in bank.head.state_dict().items()},
                                            tmp / HEAD_NAME)
            (tmp / META_NAME).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
            target = self.banks_dir / product
            old = None
            if target.exists():
                old = self.banks_dir / f".old-{product}-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        with self._lock:
            self._banks.pop(product, None)
            self._broken.pop(product, None)
            self._generation[product] = self._generation.get(product, 0) + 1
