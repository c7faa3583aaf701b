"""The demo's checkpoints: one ``.npz`` per run, written atomically, read defensively.

A checkpoint holds the leaves of every model's ``(params, opt_state)`` and a
JSON header (the run's configuration, and each model's step and history).  A
save writes a temporary file in the same folder, syncs it to the disk and
renames it over the checkpoint, so an interrupted save leaves the previous
checkpoint.  Loading reads and checks every array, so a damaged or foreign file
is reported before any training.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax.demo import _model
from blocksparse_jax.demo._train import ModelState

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run, or cannot be written (a user error)."""


def save_checkpoint(
    path: str,
    config: dict,
    states: dict[str, ModelState],
    kept: dict[str, tuple[list[np.ndarray], dict]] | None = None,
) -> None:
    """Writes ``states`` and, unchanged, the ``kept`` models of a loaded checkpoint, atomically.

    Raises:
      CheckpointError: the file cannot be written (the previous checkpoint is kept).
    """
    arrays, header = {}, {"version": CHECKPOINT_VERSION, "config": config, "models": {}}
    models = dict(kept or {})
    for kind, st in states.items():
        # Host copies of the live arrays: nothing the next step donates is referenced.
        leaves = [np.array(leaf) for leaf in jax.tree_util.tree_leaves((st.params, st.opt_state))]
        models[kind] = (
            leaves,
            {
                "step": st.step,
                "losses": [float(x) for x in st.losses],
                "timed_tokens": st.timed_tokens,
                "timed_seconds": st.timed_seconds,
                "compile_seconds": st.compile_seconds,
                "touched_sums": dict(st.touched_sums),
            },
        )
    for kind, (leaves, meta) in models.items():
        for i, leaf in enumerate(leaves):
            arrays[f"{kind}/{i:04d}"] = leaf
        header["models"][kind] = {**meta, "n_leaves": len(leaves)}
    arrays["header"] = np.array(json.dumps(header))
    parent = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(parent)
    except OSError as e:
        raise CheckpointError(
            f"--checkpoint {path!r}: cannot write it ({e.strerror or e}); "
            "the file there, if any, is the last complete save"
        ) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _fsync_folder(folder: str) -> None:
    """Makes a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_META_FIELDS = {
    "step": int,
    "losses": list,
    "timed_tokens": int,
    "timed_seconds": (int, float),
    "compile_seconds": (int, float),
    "n_leaves": int,
}


def _check_header(header) -> str | None:
    """What is wrong with a checkpoint's header, or None."""
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object"
    if "config" not in header:
        return "its header holds no run configuration"
    if header.get("version") != CHECKPOINT_VERSION:
        return f"it has version {header.get('version')!r}; this demo reads version {CHECKPOINT_VERSION}"
    if not isinstance(header["config"], dict):
        return "its run configuration is not a JSON object"
    models = header.get("models")
    if not isinstance(models, dict):
        return "its header lists no models"
    for kind, meta in models.items():
        if kind not in _model.KINDS:
            return f"it holds an unknown model {kind!r}"
        if not isinstance(meta, dict):
            return f"the entry of {kind!r} is not a JSON object"
        for field, types in _META_FIELDS.items():
            v = meta.get(field)
            if not isinstance(v, types) or isinstance(v, bool) or (field != "losses" and v < 0):
                return f"the entry of {kind!r} has no valid {field!r}"
        sums = meta.get("touched_sums", {})
        if not isinstance(sums, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for v in sums.values()
        ):
            return f"the entry of {kind!r} has no valid 'touched_sums'"
        losses = meta["losses"]
        if len(losses) != meta["step"] or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in losses
        ):
            return f"the loss history of {kind!r} does not match its step ({meta['step']})"
    return None


def load_checkpoint(path: str, config: dict) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """``(header, {kind: leaves})`` of a checkpoint written for the same ``config``.

    Every array is read (and its CRC checked) here, so a damaged file is reported
    before any training.

    Raises:
      CheckpointError: not a regular file, not an .npz, damaged, not a checkpoint
        of this demo, or written with other options.
    """
    where = f"--checkpoint {path!r}"
    if os.path.isdir(path):
        raise CheckpointError(f"{where} is a folder; give a file path")
    if not os.path.isfile(path):
        raise CheckpointError(f"{where} is not a regular file")
    fix = "delete it or give another --checkpoint path"
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read it ({e.strerror or e})") from None
    if not is_zip:
        raise CheckpointError(
            f"{where} is not a checkpoint of this demo (not an .npz archive, or a truncated one); {fix}"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z.files:
                raise CheckpointError(
                    f"{where} is an .npz archive but not a checkpoint of this demo "
                    f"(no 'header'; it holds {', '.join(map(repr, z.files[:4]))}"
                    f"{', ...' if len(z.files) > 4 else ''}); {fix}"
                )
            try:
                header = json.loads(str(z["header"][()]))
            except ValueError as e:
                raise CheckpointError(f"{where} has a damaged header ({e}); {fix}") from None
            problem = _check_header(header)
            if problem is not None:
                raise CheckpointError(f"{where} is not a checkpoint of this demo: {problem}; {fix}")
            leaves = {}
            for kind, m in header["models"].items():
                names = [f"{kind}/{i:04d}" for i in range(m["n_leaves"])]
                missing = [n for n in names if n not in z.files]
                if missing:
                    raise CheckpointError(f"{where} lacks the array {missing[0]!r}; {fix}")
                leaves[kind] = [z[n] for n in names]
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise CheckpointError(f"{where} is damaged (ValueError: {e}); {fix}") from None
        raise CheckpointError(
            f"{where} is not a checkpoint of this demo: it holds pickled Python objects, "
            f"which the demo never loads; {fix}"
        ) from None
    except Exception as e:  # zipfile.BadZipFile, zlib.error, EOFError from numpy's reader
        raise CheckpointError(f"{where} is damaged ({type(e).__name__}: {e}); {fix}") from None
    for kind, arrs in leaves.items():
        if any(a.dtype.kind not in "biuf" for a in arrs):
            raise CheckpointError(f"{where}: the arrays of {kind!r} are not numbers; {fix}")
    saved = header["config"]
    diff = [k for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
    if diff:
        what = ", ".join(f"{k} {saved.get(k)!r} there, {config.get(k)!r} now" for k in diff)
        raise CheckpointError(
            f"{where} was written for a different run ({what}); "
            "use the same options to resume, or another --checkpoint path"
        )
    return header, leaves


def restore(fresh: ModelState, leaves: list[np.ndarray], meta: dict) -> ModelState:
    """``fresh`` with the saved leaves (checked against its shapes and dtypes) and history.

    Raises:
      CheckpointError: the saved arrays do not fit the model.
    """
    ref, treedef = jax.tree_util.tree_flatten((fresh.params, fresh.opt_state))
    if len(ref) != len(leaves) or any(
        np.shape(a) != np.shape(b) or np.asarray(a).dtype != b.dtype
        for a, b in zip(ref, leaves, strict=True)
    ):
        raise CheckpointError(
            "the checkpoint's arrays do not match this model; delete it or give another path"
        )
    params, opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
    return ModelState(
        params,
        opt_state,
        step=int(meta["step"]),
        losses=[float(x) for x in meta["losses"]],
        timed_tokens=int(meta["timed_tokens"]),
        timed_seconds=float(meta["timed_seconds"]),
        compile_seconds=float(meta["compile_seconds"]),
        touched_sums={str(k): float(v) for k, v in meta.get("touched_sums", {}).items()},
    )
