"""Module loading for one app run: the bundle's files and the shims, nothing from the host.

The app never sees ``sys.modules``, ``sys.meta_path`` or the host file system: its
``__import__`` is :meth:`AppImporter.import_module`, which serves only the shims
(:data:`~device.enclave.mpy.shims.SHIM_MODULES`) and the bundle's ``.py`` files (``a/b.py`` is
module ``a.b``; ``a/__init__.py`` is package ``a``). Code objects are named ``<app:PATH>`` so no
tool ever goes looking for a host file to print source from. A simulation boundary, not a
sandbox against hostile code (the vendor is trusted, DESIGN §1).
"""

from __future__ import annotations

import builtins
import types
from collections.abc import Mapping, Sequence
from typing import Any, Final

from device.enclave.mpy.context import RunContext
from device.enclave.mpy.shims import SHIM_MODULES, make_shim

#: Host builtins an app does not get (no files, no dynamic code, no interactive helpers).
REMOVED_BUILTINS: Final = frozenset(
    {
        "open",
        "exec",
        "eval",
        "compile",
        "input",
        "breakpoint",
        "help",
        "exit",
        "quit",
        "copyright",
        "credits",
        "license",
        "__loader__",
        "__spec__",
    }
)


def code_name(path: str) -> str:
    """The ``co_filename`` of a bundle file: ``<app:PATH>``."""
    return f"<app:{path}>"


def bundle_path_of(co_filename: str) -> str | None:
    """The bundle path of a code object's file name, or None for host code."""
    if co_filename.startswith("<app:") and co_filename.endswith(">"):
        return co_filename[5:-1]
    return None


def module_paths(name: str) -> tuple[str, str]:
    """The two bundle paths that can hold module ``name``: ``a/b.py`` and ``a/b/__init__.py``."""
    base = name.replace(".", "/")
    return f"{base}.py", f"{base}/__init__.py"


class AppImporter:
    """Loads one run's modules from the bundle and the shims, each once, into fresh namespaces."""

    def __init__(self, files: Mapping[str, bytes], ctx: RunContext) -> None:
        """Serve ``files`` (bundle path → source) with the shims of ``ctx``."""
        self._files = dict(files)
        self._ctx = ctx
        self._modules: dict[str, types.ModuleType] = {}
        self.builtins = self._make_builtins()

    def _make_builtins(self) -> dict[str, Any]:
        """The app's builtins: the host's minus :data:`REMOVED_BUILTINS`; our import and print."""
        table = {k: v for k, v in vars(builtins).items() if k not in REMOVED_BUILTINS}
        table["__import__"] = self.import_module
        table["print"] = self._print
        return table

    def _print(
        self, *args: object, sep: str | None = " ", end: str | None = "\n", file: object = None
    ) -> None:
        """``print`` to the telemetry sink (``file`` is ignored: there is no other stream)."""
        sep = " " if sep is None else sep
        end = "\n" if end is None else end
        self._ctx.write_text(sep.join(str(arg) for arg in args) + end)

    def run_main(self, path: str) -> types.ModuleType:
        """Execute bundle file ``path`` as ``__main__``.

        Raises:
            ImportError: ``path`` is not in the bundle.
            BaseException: whatever the app raises.
        """
        if path not in self._files:
            raise ImportError(f"no module named '{path}'")
        return self._exec_file("__main__", path, package="")

    def import_module(
        self,
        name: str,
        globals: Mapping[str, object] | None = None,
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] | None = (),
        level: int = 0,
    ) -> types.ModuleType:
        """The app's ``__import__``: absolute and relative imports of bundle files and shims.

        Raises:
            ImportError: no such shim or bundle module (as a board says: "no module named 'os'").
        """
        fullname = self._resolve(name, globals or {}, level)
        module = self._load(fullname)
        if fromlist:
            for attr in fromlist:
                if attr != "*" and not hasattr(module, attr) and hasattr(module, "__path__"):
                    self._load_child(module, fullname, attr)
            return module
        if level == 0 and "." in name:
            return self._load(fullname.partition(".")[0])
        return module

    def _resolve(self, name: str, globals: Mapping[str, object], level: int) -> str:
        """The absolute module name of an import of ``name`` at ``level``."""
        if level == 0:
            return name
        package = str(globals.get("__package__") or "")
        parts = package.split(".") if package else []
        if level - 1 >= len(parts):
            raise ImportError("attempted relative import beyond top-level package")
        base = ".".join(parts[: len(parts) - (level - 1)])
        return f"{base}.{name}" if name else base

    def _load_child(self, parent: types.ModuleType, fullname: str, attr: str) -> None:
        """Load submodule ``attr`` of package ``fullname`` if it exists (``from pkg import m``)."""
        child = f"{fullname}.{attr}"
        if child in SHIM_MODULES or any(p in self._files for p in module_paths(child)):
            setattr(parent, attr, self._load(child))

    def _load(self, fullname: str) -> types.ModuleType:
        """Load ``fullname`` and its parents (once per run)."""
        if fullname in self._modules:
            return self._modules[fullname]
        parent, _, leaf = fullname.rpartition(".")
        parent_module = self._load(parent) if parent else None
        if fullname in SHIM_MODULES:
            module = make_shim(fullname, self._ctx)
            self._modules[fullname] = module
        else:
            module = self._load_bundle(fullname)
        if parent_module is not None:
            setattr(parent_module, leaf, module)
        return module

    def _load_bundle(self, fullname: str) -> types.ModuleType:
        """Execute the bundle file that holds ``fullname``."""
        plain, package_init = module_paths(fullname)
        if plain in self._files:
            return self._exec_file(fullname, plain, package=fullname.rpartition(".")[0])
        if package_init in self._files:
            return self._exec_file(fullname, package_init, package=fullname, is_package=True)
        raise ImportError(f"no module named '{fullname}'")

    def _exec_file(
        self, name: str, path: str, *, package: str, is_package: bool = False
    ) -> types.ModuleType:
        """Compile and run bundle file ``path`` as module ``name`` in a fresh namespace."""
        module = types.ModuleType(name)
        namespace = module.__dict__
        namespace.update({"__builtins__": self.builtins, "__file__": path, "__package__": package})
        if is_package:
            namespace["__path__"] = []
        self._modules[name] = module
        try:
            code = compile(self._files[path], code_name(path), "exec", dont_inherit=True)
            exec(code, namespace)  # noqa: S102 - this is the runtime executing the app
        except BaseException:
            del self._modules[name]
            raise
        return module
