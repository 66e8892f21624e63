"""faqd-tf's Keras classes register as soon as Keras is loaded, whatever the import order.

`keras.models.load_model(path, safe_mode=True)` finds a custom class only once the module that
defines it has run its `@keras.saving.register_keras_serializable`. `import faqd_tf` loads no
TensorFlow (the command line answers `--help` and refuses a bad config at once), so it cannot import
those modules itself. Instead it calls `install()`: where Keras is already imported, the classes
register at once; otherwise an import hook registers them right after `keras` has loaded. When one
of faqd-tf's own modules is what imports Keras, the registration waits until the outermost faqd-tf
module being imported has finished, since a half-loaded module cannot be imported from.

So both of these load any model the library saved (a subprocess test checks each order):

    import faqd_tf, keras;  keras.models.load_model("student.keras", safe_mode=True)
    import keras, faqd_tf;  keras.models.load_model("student.keras", safe_mode=True)

This module loads neither Keras nor TensorFlow.

>>> import faqd_tf, keras
>>> keras.saving.get_registered_object("faqd_tf>QuantConv2D").__module__
'faqd_tf.layers'
"""

import importlib
import importlib.abc
import sys
import threading
import warnings

MODULES = (
    "faqd_tf.quantizers",
    "faqd_tf.layers",
    "faqd_tf.models",
    "faqd_tf.losses.wrappers",
    "faqd_tf.distiller",
    "faqd_tf.keras_distillation",
)
"""Every module that defines a class registered with Keras (tests/test_registration.py checks that
no other module of the package calls `register_keras_serializable`)."""

_registered = False
# Per thread: how many faqd_tf modules this thread is executing, one inside the other.
_local = threading.local()


def register() -> None:
    """Imports every module of `MODULES`, which registers their classes with Keras (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    # Nothing is left to wait for: later imports go past no hook.
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Finder)]
    for name in MODULES:
        importlib.import_module(name)


def _register_if_ready() -> None:
    if _registered or getattr(_local, "depth", 0) or "keras" not in sys.modules:
        return
    try:
        register()
    except Exception as err:  # a failed registration must not break the user's `import keras`
        warnings.warn(
            f"faqd-tf could not register its Keras classes ({type(err).__name__}: {err}); "
            "`import faqd_tf.layers` shows why.",
            stacklevel=2,
        )


class _Loader(importlib.abc.Loader):
    """Runs the real loader's `exec_module`, then registers when that is the moment; everything else
    (resources, source for doctest) is the real loader's."""

    def __init__(self, loader, counts: bool):
        self._loader, self._counts = loader, counts

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _local.depth = getattr(_local, "depth", 0) + self._counts
        try:
            self._loader.exec_module(module)
        finally:
            _local.depth -= self._counts
        _register_if_ready()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it lets the other finders find `keras` and faqd_tf's submodules and
    puts `_Loader` around their loaders."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "keras" and not fullname.startswith("faqd_tf."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, counts=fullname != "keras")
        return spec


def install() -> None:
    """Registers now if Keras is loaded, else once it is (called by `import faqd_tf`)."""
    if not _registered and not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    _register_if_ready()


CONFIG_LIMIT = 64 * 2**20
"""The largest `config.json` a `.keras` file may declare before `unregistered_classes` reads it."""


def unregistered_classes(path: str) -> list[tuple[str, str]]:
    """The classes that the model saved in the `.keras` file `path` needs and that no loaded module
    registered with Keras: ``(registered_name, module)`` pairs, Keras's own classes left out.

    The answer Keras gives for them is a TypeError about deserialization; this names the class and
    the module that defines it (import it, then load).

    Raises:
      ValueError: `path` is not a `.keras` file, or its `config.json` is not JSON or declares more
        than `CONFIG_LIMIT` bytes.
    """
    import json
    import zipfile

    import keras

    try:
        with zipfile.ZipFile(path) as archive:
            size = archive.getinfo("config.json").file_size
            if size > CONFIG_LIMIT:
                raise ValueError(
                    f"{path}: its config.json declares {size:,} bytes, more than {CONFIG_LIMIT:,}"
                )
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a .keras file ({err})") from None
    missing, stack = {}, [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            name, module = item.get("registered_name"), item.get("module")
            if (
                isinstance(name, str)
                and isinstance(module, str)
                and module.split(".")[0] != "keras"
                and "class_name" in item
                and keras.saving.get_registered_object(name) is None
            ):
                missing[name] = module
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return sorted(missing.items())
