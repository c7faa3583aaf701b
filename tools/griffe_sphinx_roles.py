"""A Griffe extension: Sphinx roles in docstrings become mkdocstrings cross-references.

The docstrings name other objects the Sphinx way (``:func:`h_log_softmax```,
``:class:`~blocksparse_jax.HSoftmaxParams```).  A role naming a public object
(a public module, or a name in a public module's ``__all__``) becomes a link,
``[`h_log_softmax`][blocksparse_jax.h_log_softmax]``, which ``mkdocs build
--strict`` fails on if no page documents it; any other role (a private helper)
becomes plain code.
"""

from __future__ import annotations

import importlib
import re

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`(~?)([\w.]+)`")


def _public_module(path: str):
    if any(part.startswith("_") for part in path.split(".")):
        return None
    try:
        return importlib.import_module(path)
    except ImportError:
        return None


def _resolve(name: str, context: list[str]) -> str | None:
    """The public dotted path ``name`` refers to, seen from the modules in ``context``."""
    candidates = [name] if "." in name else [f"{c}.{name}" for c in context]
    for path in candidates:
        if _public_module(path) is not None:
            return path
        module, _, attr = path.rpartition(".")
        mod = _public_module(module) if module else None
        if mod is not None and attr in getattr(mod, "__all__", ()):
            return path
    return None


def _exists(name: str, obj: griffe.Object) -> bool:
    """Whether ``name`` names anything (private included), seen from ``obj``."""
    if name.startswith("."):  # relative to the package of obj's module
        name = obj.module.path.rpartition(".")[0] + name
    scopes = [""] if "." in name else []
    o = obj
    while o is not None:
        scopes.append(o.path + ".")
        o = o.parent
    for scope in scopes:
        module, _, attr = (scope + name).rpartition(".")
        while module:
            try:
                value = importlib.import_module(module)
                break
            except ImportError:
                module, _, rest = module.rpartition(".")
                attr = f"{rest}.{attr}"
        else:
            continue
        for part in attr.split("."):
            value = getattr(value, part, None)
        if value is not None:
            return True
    return False


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is None:
            return
        # Names are looked up in the object's public package, then the top level.
        parts = obj.path.split(".")
        context = []
        for i in range(len(parts), 0, -1):
            prefix = ".".join(p for p in parts[:i])
            if not any(p.startswith("_") for p in parts[:i]) and prefix not in context:
                context.append(prefix)
        context.append("blocksparse_jax")

        def link(m: re.Match) -> str:
            tilde, name = m.groups()
            shown = name.rsplit(".", 1)[-1] if tilde else name
            target = _resolve(name, context)
            if target is None and not _exists(name, obj):
                target = name  # a link to nothing: mkdocs build --strict reports it
            return f"`{shown}`" if target is None else f"[`{shown}`][{target}]"

        obj.docstring.value = _ROLE.sub(link, obj.docstring.value)
