"""``python -m mutualkd``: the command line, as the ``mutualkd`` script runs it.

Started in the parent folder of a clone named ``mutualkd`` (which has no ``__init__.py``),
Python finds that clone first, as a namespace package: an editable install's finder comes
after the search of ``sys.path``, so ``mutualkd`` is an empty package and only its submodules,
this one included, are found through the install. The real package is put in its place here,
before the command imports anything from it.
"""

from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
import sys


def _replace_namespace_shadow() -> None:
    """Load this folder's ``__init__.py`` as ``mutualkd`` when the one imported is a namespace package."""
    shadow = sys.modules.get("mutualkd")
    if shadow is None or getattr(shadow, "__file__", None) is not None:
        return
    here = Path(__file__).resolve().parent
    spec = spec_from_file_location("mutualkd", here / "__init__.py", submodule_search_locations=[str(here)])
    assert spec is not None and spec.loader is not None
    package = module_from_spec(spec)
    sys.modules["mutualkd"] = package
    spec.loader.exec_module(package)


_replace_namespace_shadow()

from mutualkd.cli import main  # noqa: E402  (after the package is the real one)

if __name__ == "__main__":
    main()
